"""The optimizer-step schedule of a run at a world size: the one owner of global batch, steps per
epoch, total and warm-up steps, and the records an epoch drops.

    s = schedule(cfg, world_size=16, num_records=800)
    check_schedule(s, cfg)   # ConfigError (one line) for a degenerate schedule

An optimizer step takes global_batch = micro x accum x world records; an epoch is
num_records // global_batch steps and the tail that does not fill a step is dropped (every rank
runs the same number of forwards, which ZeRO-3 needs). Torch-free: the launcher and `cat-ds plan`
call it before any rank starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cat_ds.config import ConfigError

if TYPE_CHECKING:
    from cat_ds.config import Config, TrainConfig

MAX_DROPPED = 0.10  # more than this share of records dropped per epoch is refused (train.allow_dropped_records)


@dataclass(frozen=True)
class Schedule:
    num_records: int
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int  # micro x accum x world
    steps_per_epoch: int  # num_records // global_batch (the tail is dropped)
    total_steps: int  # train.max_steps if > 0 else epochs x steps_per_epoch
    warmup_steps: int
    dropped_per_epoch: int  # num_records % global_batch

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_per_epoch / self.num_records if self.num_records else 0.0

    def describe(self) -> str:
        """One line for humans (`cat-ds plan`, the launcher)."""
        return (f"{self.num_records} records, world {self.world_size}: global batch {self.global_batch} "
                f"(micro {self.micro_batch} x accum {self.grad_accum} x {self.world_size}), "
                f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps in all, "
                f"{self.warmup_steps} warm-up, {self.dropped_per_epoch} records dropped per epoch "
                f"({100 * self.dropped_fraction:.1f} %)")


def global_batch(train: "TrainConfig", world_size: int) -> int:
    """Records per optimizer step: micro_batch_size x grad_accum x world_size."""
    return train.micro_batch_size * train.grad_accum * world_size


def schedule(cfg: "Config", world_size: int, num_records: int) -> Schedule:
    t = cfg.train
    g = global_batch(t, world_size)
    per_epoch = num_records // g
    total = t.max_steps if t.max_steps > 0 else t.epochs * per_epoch
    return Schedule(num_records=num_records, world_size=world_size, micro_batch=t.micro_batch_size,
                    grad_accum=t.grad_accum, global_batch=g, steps_per_epoch=per_epoch, total_steps=total,
                    warmup_steps=t.warmup_steps, dropped_per_epoch=num_records % g)


def schedule_problems(s: Schedule, cfg: "Config") -> list[str]:
    """Why this schedule is degenerate, one line each naming the keys to change; [] when it is fine."""
    t = cfg.train
    batch = (f"global batch {s.global_batch} = train.micro_batch_size {s.micro_batch} x train.grad_accum "
             f"{s.grad_accum} x world size {s.world_size}")
    if s.steps_per_epoch == 0:
        return [f"an epoch has no optimizer step: {s.num_records} training records < {batch}; "
                "lower train.micro_batch_size or train.grad_accum, or use fewer ranks"]
    out = []
    if s.warmup_steps and s.warmup_steps >= s.total_steps:
        out.append(f"train.warmup_steps {s.warmup_steps} is not shorter than the run ({s.total_steps} steps: "
                   f"{'train.max_steps' if t.max_steps > 0 else f'train.epochs {t.epochs} x {s.steps_per_epoch} steps/epoch'}"
                   f"); lower train.warmup_steps or lengthen the run")
    # Only a run that reaches the end of an epoch drops its tail.
    if (s.dropped_fraction > MAX_DROPPED and s.total_steps >= s.steps_per_epoch
            and not t.allow_dropped_records):
        out.append(f"{s.dropped_per_epoch} of {s.num_records} training records ({100 * s.dropped_fraction:.0f} %) "
                   f"are dropped every epoch ({batch} does not divide them); choose a batch that divides the data "
                   f"better, or set train.allow_dropped_records: true")
    return out


def check_schedule(s: Schedule, cfg: "Config", src: str = "config") -> None:
    """Raise ConfigError (one line, every problem) for a degenerate schedule."""
    problems = schedule_problems(s, cfg)
    if problems:
        raise ConfigError(f"{src}: schedule at world size {s.world_size}: " + "; ".join(problems))
