"""One run on every rank, in the order it happens (`run` below: what cat_ds/train.py calls):
`Trainer.setup()` (process group, files, data, schedule, ds_config, model, DeepSpeed, resume, logger),
`train()` ("finished", or "stopped" by SIGTERM/SIGUSR1 after a checkpoint), `cleanup(status)`.

One optimizer step (`train_step`), this rank's grad_accum micro-batches: batch -> step counts (one
all-reduce) -> forward -> LM loss + cat_weight x CAT loss -> backward -> step -> metrics and the
stop decision (one all-reduce). DeepSpeed owns optimizer, scheduler, precision, accumulation and
clipping; engine/normalization.py says how each loss is scaled for it. Logged per step (rank 0):
epoch, loss, lm_loss, cat_loss (before the weight), amplitude (the weight), lr, grad_norm,
tokens_per_s, attn_ratio, step_time_s.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from cat_ds.config import Config, dump_yaml
from cat_ds.engine import checkpoint
from cat_ds.engine.distributed import (DistInfo, StopSignal, all_reduce_sum, exit_on_lost_peer, init_distributed,
                                      use_timeout)
from cat_ds.engine.ds_config import checkpoint_root, final_ds_config, load_ds_config, zero_stage
from cat_ds.engine.export import export_checkpoint, write_hf_files
from cat_ds.engine.faults import Faults
from cat_ds.engine.model import answer_lm_loss, takes_logits_mask
from cat_ds.engine.normalization import LossScale
from cat_ds.engine.prepare import main_rank_first, prepare_rank, tokenize_train
from cat_ds.reattention import CatContext, amplitude, count_rows, reattention_loss, select
from cat_ds.schedule import check_schedule, schedule
from cat_ds.tracking.base import run_logger


@dataclass
class StepCounts:
    """The whole step's counts over every rank (the "global" normalisations' denominators)."""
    cat_rows: float
    answer_tokens: float


@dataclass
class StepStats:
    """One micro-batch's share of the step's metrics, left on the device (no host sync per micro-batch)."""
    lm_loss: torch.Tensor
    cat_loss: torch.Tensor  # before cat_weight
    ratio_sum: torch.Tensor  # a1/a0 summed over counted CAT rows
    ratio_rows: torch.Tensor
    tokens: torch.Tensor  # non-padding tokens

    def as_tensor(self) -> torch.Tensor:
        fields = (self.lm_loss, self.cat_loss, self.ratio_sum, self.ratio_rows, self.tokens)
        return torch.stack([f.double() for f in fields])


@dataclass
class StepResult:
    metrics: dict[str, float]
    stop: bool  # every rank agrees: a stop signal reached some rank


class Trainer:
    def __init__(self, cfg: Config, ds_config_path: str, *, resume: str | None = None, faults: Faults | None = None,
                 info: DistInfo | None = None, logger=None, evaluate: bool = True):
        """`logger` None: metrics.jsonl (+ MLflow) on rank 0; `evaluate` False: no evaluation (benchmarks)."""
        self.cfg, self.ds_config_path, self.resume, self.faults = cfg, ds_config_path, resume, faults
        self.info, self.logger, self.evaluate_enabled = info, logger, evaluate
        self.step = 0  # completed optimizer steps
        self.last_saved = -1
        self.resumed = False
        self.evaluator = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Files and data (main rank first), the ds_config, the model under ZeRO, DeepSpeed, resume, logger."""
        self.info = self.info or init_distributed()
        use_timeout("setup")  # rank 0 may convert or tokenise for long while the others wait
        prepare_rank(self.cfg, self.info)  # rank 0: shared files; each node's local rank 0: its model
        self._load_data()
        self._build_engine()
        torch.manual_seed(self.cfg.train.seed)
        if self.resume == "auto":
            self._resume()
        if self.logger is None:
            self.logger = run_logger(self.cfg, is_main=self.info.is_main, start_step=self.step, resumed=self.resumed)
            if not self.resumed:
                self.logger.log_params({**self.cfg.to_dict(), "ds_config": self.ds_config})
                for name in ("config.yaml", "ds_config.json"):  # the resolved configs, as written by setup
                    self.logger.log_artifact(Path(self.cfg.output_dir) / name, "config")
        if self.evaluate_enabled:
            from cat_ds.evaluation import Evaluator

            self.evaluator = Evaluator.from_config(self.cfg, self.tokenizer, self.dataset)
        use_timeout("train")

    def _load_data(self) -> None:
        from cat_ds.data.collate import CatCollator
        from cat_ds.engine.data import StepBatches
        from cat_ds.engine.model import load_tokenizer

        cfg, info = self.cfg, self.info
        self.tokenizer = load_tokenizer(cfg)
        self.dataset = main_rank_first(info, lambda: tokenize_train(cfg, self.tokenizer))
        self.schedule = schedule(cfg, info.world_size, len(self.dataset))
        check_schedule(self.schedule, cfg)  # the launcher checked already; a direct srun/torchrun did not
        self.batches = StepBatches(self.dataset, CatCollator(self.tokenizer.pad_token_id), self.schedule,
                                   rank=info.rank, seed=cfg.train.seed)
        self.loss_scale = LossScale.of(cfg.train.grad_accum, info.world_size)

    def _build_engine(self) -> None:
        import deepspeed

        from cat_ds.engine.model import build_model, describe, load_model_config
        from cat_ds.engine.preflight import check_cat_shape

        cfg, info = self.cfg, self.info
        model_config = load_model_config(cfg)
        check_cat_shape(cfg, model_config.to_dict())  # a hub or GGUF model: its shape is known only now
        self.ds_config = final_ds_config(load_ds_config(self.ds_config_path), cfg, world_size=info.world_size,
                                         total_steps=self.schedule.total_steps, on_gpu=info.device.type == "cuda",
                                         hidden_size=getattr(model_config, "hidden_size", None),
                                         src=self.ds_config_path)
        if info.is_main:
            self._write_run_files()
        # hf_ds_config: transformers reads it through a weak reference; kept as long as the engine.
        model, self.hf_ds_config = build_model(cfg, self.ds_config, on_gpu=info.device.type == "cuda",
                                               vocab_size=len(self.tokenizer))
        for line in describe(model, zero_stage=zero_stage(self.ds_config), world_size=info.world_size,
                             lora=cfg.model.lora):
            self._say(line)
        self.engine, *_ = deepspeed.initialize(model=model, config=self.ds_config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        model_config = self.engine.module.config
        self.num_layers, self.num_heads = model_config.num_hidden_layers, model_config.num_attention_heads
        self.keep_logits = takes_logits_mask(self.engine.module)

    def _write_run_files(self) -> None:
        out, s = Path(self.cfg.output_dir), self.schedule
        (out / "config.yaml").write_text(dump_yaml(self.cfg))
        (out / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        run = {"total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch, "global_batch": s.global_batch,
               "world_size": s.world_size}  # what a watcher of metrics.jsonl needs for progress and ETA
        (out / "run.json").write_text(json.dumps(run) + "\n")

    def _resume(self) -> None:
        state = checkpoint.load(self.engine, self.cfg.output_dir, rank=self.info.rank, world_size=self.info.world_size)
        if state is None:
            self._say(f"--resume auto: no checkpoint in {self.cfg.output_dir}, starting from scratch")
            return
        self.step = self.last_saved = int(state["step"])  # never rewrite that checkpoint (latest points to it)
        self.resumed = True
        if state.get("global_batch") != self.schedule.global_batch:
            self._say(f"warning: global batch changed ({state.get('global_batch')} -> {self.schedule.global_batch});"
                      " data order after resume differs from the original run")
        self._say(f"resumed from {state['tag']} (step {self.step}, epoch {state['epoch']})")

    # ------------------------------------------------------------------ the run
    def train(self, start_step: int | None = None) -> str:
        """Steps to the end (then final checkpoint, evaluation, export), or to an agreed stop signal."""
        from cat_ds.engine.model import gradient_checkpointing_active

        if start_step is not None:
            self.step = start_step
            self.last_saved = start_step if start_step > 0 else -1
        stop_signal, total = StopSignal(), self.schedule.total_steps
        self.engine.train()
        if self.cfg.model.gradient_checkpointing and not gradient_checkpointing_active(self.engine.module):
            raise RuntimeError("model.gradient_checkpointing is on but no module will checkpoint (eval mode?)")
        bar, stopped = self._progress_bar(), False
        while self.step < total:
            if self.faults is not None:
                self.faults.before_step(self.step, self.info)
            result = self.train_step(self.step, stop_signal.requested)
            self.step += 1
            self._log_step(result.metrics, bar)
            if result.stop:
                self._say(f"stop signal received: saving at step {self.step} and exiting")
                stopped = True
                break
            if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < total:
                self.evaluate()
            if self.cfg.train.save_every and self.step % self.cfg.train.save_every == 0:
                self.save()
        bar.close()
        if self.last_saved != self.step:
            self.save()
        if stopped:
            return "stopped"
        self.evaluate()
        self._export()
        return "finished"

    def train_step(self, step: int, stop_requested: bool = False) -> StepResult:
        """One optimizer step; every rank calls it with the same step."""
        start = time.perf_counter()
        micro_batches = self.batches.step(step)
        cat_weight = self._cat_weight(step)
        counts = self._count(micro_batches)
        selection = None
        if self.cfg.cat.enabled:  # same heads on every rank: seeded by (seed, step)
            selection = select(self.num_layers, self.num_heads, layers=self.cfg.cat.layers,
                               heads=self.cfg.cat.heads, seed=self.cfg.train.seed, step=step)
        lr = self.engine.get_lr()[0]
        totals = torch.zeros(6, dtype=torch.float64, device=self.info.device)  # StepStats fields, then stop
        for batch in micro_batches:
            totals[:5] += self._micro_step(batch, counts, selection, cat_weight).as_tensor()
        totals[5] = float(stop_requested)
        lm_loss, cat_loss, ratio_sum, ratio_rows, tokens, stop = all_reduce_sum(totals).tolist()
        grad_norm = self.engine.get_global_grad_norm()
        seconds = time.perf_counter() - start
        metrics = {"epoch": step // self.schedule.steps_per_epoch, "loss": lm_loss + cat_weight * cat_loss,
                   "lm_loss": lm_loss, "cat_loss": cat_loss, "amplitude": cat_weight, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                   "tokens_per_s": tokens / seconds, "attn_ratio": ratio_sum / ratio_rows if ratio_rows else math.nan,
                   "step_time_s": seconds}
        return StepResult(metrics, stop > 0)

    def _cat_weight(self, step: int) -> float:
        """The CAT loss's weight this step (`cat.amplitude` schedule); 0 when CAT is off."""
        c, per_epoch = self.cfg.cat, self.schedule.steps_per_epoch
        if not c.enabled:
            return 0.0
        return amplitude(c.amplitude, decay=c.decay, epoch=step // per_epoch, step=step, steps_per_epoch=per_epoch)

    def _count(self, micro_batches: list[dict]) -> StepCounts:
        """The step's CAT rows and answer tokens over every rank: one small all-reduce, before any forward."""
        rows = sum(count_rows(b) for b in micro_batches) if self.cfg.cat.enabled else 0
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        counts = torch.tensor([rows, tokens], dtype=torch.float64, device=self.info.device)
        return StepCounts(*all_reduce_sum(counts).tolist())

    def _micro_step(self, batch: dict, counts: StepCounts, selection, cat_weight: float) -> StepStats:
        cfg, scale, dev = self.cfg, self.loss_scale, self.info.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        extra = {}
        if cfg.train.lm_normalization == "global":
            extra["num_items_in_batch"] = scale.lm_items(counts.answer_tokens)
        elif not bool((batch["labels"][:, 1:] != -100).any()):
            extra["num_items_in_batch"] = 1.0  # no answer token (all truncated): loss 0, not mean-of-nothing NaN
        context = None
        if selection is not None:
            layers, heads = selection
            context = CatContext.from_batch(batch, layers=layers, heads=heads, num_heads=self.num_heads)
            extra["cat"] = context
        lm_loss = answer_lm_loss(self.engine, batch, extra, self.keep_logits)
        loss, zero = lm_loss, torch.zeros((), dtype=torch.float64, device=dev)
        stats = StepStats(scale.lm_share(lm_loss.detach().double()), zero, zero, zero,
                          batch["attention_mask"].sum().double())
        if context is not None:
            norm = cfg.cat.normalization
            cat_out = reattention_loss(context, alpha=cfg.cat.alpha, loss_type=cfg.cat.loss_type, normalization=norm,
                                       denominator=counts.cat_rows, granularity=cfg.cat.granularity)
            loss = loss + cat_weight * cat_out.loss * scale.cat_backward_factor(norm)
            stats.cat_loss = scale.cat_share(cat_out.loss.detach().double(), norm)
            if cat_out.num_counted:
                stats.ratio_sum = (cat_out.a1 / cat_out.a0)[cat_out.counted].detach().double().sum()
                stats.ratio_rows = cat_out.counted.sum()
        self.engine.backward(loss)
        self.engine.step()
        return stats

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.schedule.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                    disable=not (self.info.is_main and sys.stderr.isatty()))

    def _log_step(self, m: dict, bar) -> None:
        self.logger.log_metrics(self.step, m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", cat=f"{m['cat_loss']:.3f}", refresh=False)
        # The last step always prints: a log's final line then says how the run ended.
        if bar.disable and (self.step % self.cfg.train.log_every == 0 or self.step == self.schedule.total_steps):
            self._say(f"step {self.step}/{self.schedule.total_steps} epoch {m['epoch']} loss {m['loss']:.4f} "
                      f"lm {m['lm_loss']:.4f} cat {m['cat_loss']:.4f} amp {m['amplitude']:.3f} lr {m['lr']:.3g} "
                      f"gnorm {m['grad_norm']:.3f} tok/s {m['tokens_per_s']:.0f}")

    # ------------------------------------------------------------------ evaluate, save, export, cleanup
    def evaluate(self) -> None:
        """Every rank (ZeRO-3 generation is collective); the evaluator returns metrics and files, logged here once."""
        if self.evaluator is None:
            return
        out = self.evaluator(self.engine.module, self.step)
        self.engine.module.train()
        for f in out.files:
            self.logger.log_artifact(f, f"predictions/step_{self.step}")
        if out.metrics:
            self.logger.log_metrics(self.step, out.metrics)
            shown = {k: v for k, v in out.metrics.items() if k.endswith("accuracy") or k == "probe/attn_ratio"}
            self._say(" ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        if out.is_best:  # the same decision on every rank: the save is collective
            metric, value = self.evaluator.best_metric, self.evaluator.best_value
            checkpoint.save(self.engine, Path(self.cfg.output_dir) / "best", step=self.step, keep_last=1,
                            client_state={"step": self.step, metric: value}, rank=self.info.rank,
                            hf_files=self._hf_files(), faults=self.faults)

    def save(self) -> None:
        """A resumable checkpoint of the current step (collective)."""
        epoch, position = self.batches.position(self.step)
        state = {"step": self.step, "epoch": epoch, "position": position, "world_size": self.info.world_size,
                 "global_batch": self.schedule.global_batch, "seed": self.cfg.train.seed}
        checkpoint.save(self.engine, self.cfg.output_dir, step=self.step, client_state=state, rank=self.info.rank,
                        keep_last=self.cfg.train.keep_last, hf_files=self._hf_files(), faults=self.faults)
        self.last_saved = self.step
        self._say(f"saved checkpoint step {self.step} -> {checkpoint_root(self.cfg.output_dir)}")

    def _hf_files(self):
        return partial(write_hf_files, self.engine.module, self.tokenizer)

    def _export(self) -> None:
        """Rank 0 only, no barrier: the others may leave; a large export can outlast a collective timeout."""
        if not (self.cfg.train.export and self.info.is_main):
            return
        out = export_checkpoint(checkpoint_root(self.cfg.output_dir), Path(self.cfg.output_dir) / "export")
        self._say(f"exported Hugging Face model -> {out}")
        self.logger.log_params({"export.path": str(Path(out).resolve())})

    def cleanup(self, status: str) -> None:
        """Close the logger (MLflow run status from the run's status); safe after a failed setup."""
        if self.logger is not None:
            self.logger.close("FINISHED" if status in ("finished", "stopped") else "FAILED")

    def where(self) -> tuple[str, str]:
        """For the line a lost peer prints: what was running, and the checkpoint a resume continues from."""
        what = f"step {self.step + 1}" if self.step < self.schedule.total_steps else "the final evaluation or save"
        return what, checkpoint.tag_for(self.last_saved) if self.last_saved >= 0 else "step 0 (no checkpoint yet)"

    def _say(self, msg: str) -> None:
        if self.info.is_main:
            print(f"[cat-ds] {msg}", flush=True)


def run(cfg: Config, ds_config_path: str, *, resume: str | None = None, faults: Faults | None = None) -> str:
    """What cat_ds/train.py calls on every rank: "finished" or "stopped"; raises on failure."""
    trainer, status = Trainer(cfg, ds_config_path, resume=resume, faults=faults), "failed"
    try:
        trainer.setup()
        with exit_on_lost_peer(trainer.where):  # a lost node: one line naming it, then exit
            status = trainer.train()
    finally:
        trainer.cleanup(status)
    return status
