"""Fault injection for the engine's tests: one object, None in every real run.

    CAT_DS_TEST_FAULTS="raise_at=1:2;sigkill_at=5;kill_in_save=6;signal_at=3:15"

Read once, by the entry point (cat_ds/train.py), and handed to the Trainer and to checkpoint.save;
nothing else reads the environment for it.
    raise_at=RANK:STEP      that rank raises RuntimeError entering step STEP (0-based)
    sigkill_at=STEP         rank 0 SIGKILLs itself entering step STEP
    signal_at=STEP:SIGNUM   every rank sends itself SIGNUM entering step STEP (as Slurm signals every task)
    kill_in_save=STEP       rank 0 SIGKILLs itself in the save of step STEP: files written, not committed
    pause_at=STEP:SECONDS[,STEP:SECONDS]  every rank sleeps SECONDS entering step STEP (a window to
                            signal a job or kill a node mid-run at a known step)
A new fault: a field, its parser in PARSERS, and its check in `before_step` (which sees the rank's
DistInfo: rank, local rank, world size) or `in_save`.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace

from cat_ds.config import ConfigError

ENV = "CAT_DS_TEST_FAULTS"


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(":")
    return int(a), int(b)


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(_pair(p) for p in text.split(","))


PARSERS = {"raise_at": _pair, "sigkill_at": int, "signal_at": _pair, "kill_in_save": int, "pause_at": _pairs}


@dataclass(frozen=True)
class Faults:
    raise_at: tuple[int, int] | None = None  # (rank, step)
    sigkill_at: int | None = None  # step
    signal_at: tuple[int, int] | None = None  # (step, signum)
    kill_in_save: int | None = None  # step
    pause_at: tuple[tuple[int, int], ...] = ()  # (step, seconds), ...

    @classmethod
    def parse(cls, text: str | None) -> "Faults | None":
        """`name=value;...` -> Faults; None for an empty or absent value."""
        faults = cls()
        for item in filter(None, (part.strip() for part in (text or "").split(";"))):
            name, _, value = item.partition("=")
            try:
                faults = replace(faults, **{name: PARSERS[name](value)})
            except (KeyError, ValueError):
                raise ConfigError(f"{ENV}: cannot read {item!r} (known: "
                                  f"{', '.join(f'{k}=...' for k in PARSERS)})") from None
        return faults if faults != cls() else None

    @classmethod
    def from_env(cls) -> "Faults | None":
        return cls.parse(os.environ.get(ENV))

    def before_step(self, step: int, info) -> None:
        """Entering optimizer step `step` (0-based) on the rank `info` (engine/distributed.py:DistInfo) describes."""
        rank = info.rank
        if self.raise_at == (rank, step):
            raise RuntimeError(f"{ENV} raise_at: rank {rank} fails at step {step}")
        if self.sigkill_at == step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.signal_at is not None and self.signal_at[0] == step:
            os.kill(os.getpid(), self.signal_at[1])
        for at, seconds in self.pause_at:
            if at == step:
                time.sleep(seconds)

    def in_save(self, step: int, rank: int) -> None:
        if self.kill_in_save == step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
