"""The training loop: one optimizer step = this rank's `grad_accum` micro-batches.

    loss = lm_loss + amplitude * cat_loss          (cat_loss = 0 when cat.enabled is false)

DeepSpeed owns optimizer, scheduler, precision, accumulation and clipping: we call
`engine(...)`, `engine.backward(loss)`, `engine.step()` per micro-batch. DeepSpeed divides
each micro-batch loss by grad_accum and averages gradients over ranks; the "global"
normalisations (train.lm_normalization, cat.normalization) divide by the whole step's count
(all-reduced before the step) and multiply by grad_accum x world, so the gradient is that of
the step's sum / count, independent of how the step is split into micro-batches and ranks.

Logged per optimizer step (rank 0, metrics.jsonl + optional MLflow): step (completed steps),
epoch, loss, lm_loss, cat_loss (before amplitude), amplitude, lr, grad_norm, tokens_per_s,
attn_ratio (mean a1/a0 over supervised rows, CAT runs), step_time_s.
"""
from __future__ import annotations

import inspect
import math
import os
import signal
import sys
import time
from typing import Callable

import torch

from cat_ds.config import Config
from cat_ds.engine import checkpoint
from cat_ds.engine.distributed import all_reduce_sum
from cat_ds.engine.model import gradient_checkpointing_active
from cat_ds.reattention import CatContext, amplitude, count_rows, reattention_loss, select

# evaluate(model, step) -> {"eval/iid/accuracy": 0.93, ...}; called on EVERY rank (ZeRO-3
# generation is collective), results logged by rank 0.
EvalFn = Callable[[torch.nn.Module, int], dict]


class StopRequested:
    """SIGTERM/SIGUSR1 set a flag; the loop agrees on it across ranks at the step boundary,
    saves a checkpoint and returns (Slurm's preemption/time-limit signal)."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True


class Loop:
    def __init__(self, cfg: Config, engine, batches, tokenizer, *, info, total_steps: int, logger,
                 evaluate: EvalFn | None):
        self.cfg, self.engine, self.batches, self.tokenizer, self.info = cfg, engine, batches, tokenizer, info
        self.total_steps, self.logger, self.evaluate = total_steps, logger, evaluate
        mc = engine.module.config
        self.num_layers, self.num_heads = mc.num_hidden_layers, mc.num_attention_heads
        self.scale = cfg.train.grad_accum * info.world_size  # DeepSpeed's averaging factor
        # The model's forward takes a boolean logits_to_keep mask (transformers >= 5, most CausalLMs).
        self.keep_logits = "logits_to_keep" in inspect.signature(engine.module.forward).parameters
        self.step = 0  # completed optimizer steps
        self.last_saved = -1

    # ------------------------------------------------------------------ one optimizer step
    def amplitude(self, step: int) -> float:
        c = self.cfg.cat
        if not c.enabled:
            return 0.0
        epoch = step // self.batches.steps_per_epoch
        return amplitude(c.amplitude, decay=c.decay, epoch=epoch, step=step,
                         steps_per_epoch=self.batches.steps_per_epoch)

    def train_step(self, step: int, stop_flag: bool) -> dict:
        cfg, eng, dev = self.cfg, self.engine, self.info.device
        t0 = time.perf_counter()
        mbs = self.batches.step(step)
        amp = self.amplitude(step)
        # Step-wide counts for the global normalisations: one small all-reduce, before any forward.
        counts = torch.tensor([sum(count_rows(mb) for mb in mbs) if cfg.cat.enabled else 0,
                               sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs)],
                              dtype=torch.float64, device=dev)
        n_rows, n_tokens = all_reduce_sum(counts).tolist()
        if cfg.cat.enabled:  # same heads on every rank: seeded by (seed, step)
            layers, heads = select(self.num_layers, self.num_heads, layers=cfg.cat.layers, heads=cfg.cat.heads,
                                   seed=cfg.train.seed, step=step)
        acc = torch.zeros(6, dtype=torch.float64, device=dev)  # lm, cat, ratio_sum, ratio_n, tokens, stop
        lr = eng.get_lr()[0]
        for mb in mbs:
            mb = {k: v.to(dev) for k, v in mb.items()}
            kw = {}
            if cfg.train.lm_normalization == "global":
                kw["num_items_in_batch"] = max(n_tokens, 1.0) / self.scale
            elif not bool((mb["labels"][:, 1:] != -100).any()):
                kw["num_items_in_batch"] = 1.0  # no answer token (all truncated): loss 0, not mean-of-nothing NaN
            ctx = None
            if cfg.cat.enabled:
                ctx = CatContext.from_batch(mb, layers=layers, heads=heads, num_heads=self.num_heads)
                kw["cat"] = ctx
            out = self.forward(mb, kw)
            loss = out.loss
            if ctx is not None:
                res = reattention_loss(ctx, alpha=cfg.cat.alpha, loss_type=cfg.cat.loss_type,
                                       normalization=cfg.cat.normalization, denominator=n_rows,
                                       granularity=cfg.cat.granularity)
                glob = cfg.cat.normalization == "global"
                loss = loss + amp * res.loss * (self.scale if glob else 1.0)
                # Metrics stay on the device (no host sync per micro-batch).
                acc[1] += res.loss.detach().double() / (1.0 if glob else self.scale)
                if res.num_counted:
                    acc[2] += (res.a1 / res.a0)[res.counted].detach().double().sum()
                    acc[3] += res.num_counted
            acc[0] += out.loss.detach().double() / self.scale
            acc[4] += mb["attention_mask"].sum()
            eng.backward(loss)
            eng.step()
        acc[5] = float(stop_flag)
        lm, cat, rsum, rn, tokens, stop = all_reduce_sum(acc).tolist()
        gn = eng.get_global_grad_norm()
        dt = time.perf_counter() - t0
        return {"epoch": step // self.batches.steps_per_epoch, "loss": lm + amp * cat, "lm_loss": lm, "cat_loss": cat,
                "amplitude": amp, "lr": lr, "grad_norm": float(gn) if gn is not None else math.nan,
                "tokens_per_s": tokens / dt, "attn_ratio": rsum / rn if rn else math.nan, "step_time_s": dt,
                "_stop": stop > 0}

    def forward(self, mb: dict, kw: dict):
        """The model's forward and LM loss (mean over answer tokens, or sum / num_items_in_batch).

        Why not `labels=`: the model would project every position onto the vocabulary (49k x 576
        on SmolLM2: a fifth of the step's FLOPs) while only the few answer positions carry a label.
        `logits_to_keep` (a boolean mask, transformers >= 5) keeps just those; transformers' own
        loss function then gets their shifted labels. Same loss, same gradients."""
        eng = self.engine
        if not self.keep_logits:
            return eng(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"], **kw)
        labels = mb["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
        cat = {"cat": kw["cat"]} if "cat" in kw else {}
        out = eng(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], logits_to_keep=keep, **cat)
        extra = {"num_items_in_batch": kw["num_items_in_batch"]} if "num_items_in_batch" in kw else {}
        out.loss = eng.module.loss_function(logits=out.logits, labels=None, vocab_size=out.logits.shape[-1],
                                            shift_labels=labels[:, 1:][keep[:, :-1]], **extra)
        return out

    # ------------------------------------------------------------------ the run
    def save(self) -> None:
        epoch, pos = self.batches.position(self.step)
        state = {"step": self.step, "epoch": epoch, "position": pos, "world_size": self.info.world_size,
                 "global_batch": self.batches.global_batch, "seed": self.cfg.train.seed}
        checkpoint.save(self.engine, self.cfg.output_dir, step=self.step, client_state=state, rank=self.info.rank,
                        keep_last=self.cfg.train.keep_last, hf_files=self._hf_files)
        self.last_saved = self.step
        self._say(f"saved checkpoint step {self.step} -> {checkpoint.checkpoint_root(self.cfg.output_dir)}")

    def _hf_files(self, d) -> None:
        """What export needs besides the weights: the model config (training dtype), the tokenizer and,
        with LoRA, the adapter config (which names the frozen base)."""
        from cat_ds.engine.lora import is_peft, save_adapter_config

        self.engine.module.config.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        if is_peft(self.engine.module):
            save_adapter_config(self.engine.module, d)

    def run_eval(self) -> None:
        if self.evaluate is None:
            return
        out = self.evaluate(self.engine.module, self.step)
        self.engine.module.train()
        # A plain dict of metrics, or an object with .metrics and .files (cat_ds.evaluation.EvalOutput).
        results = out if isinstance(out, dict) else out.metrics
        for f in getattr(out, "files", []):
            self.logger.log_artifact(f, "predictions")
        if results:
            self.logger.log_metrics(self.step, results)
            shown = {k: v for k, v in results.items() if k.endswith("accuracy") or k == "probe/attn_ratio"}
            self._say(" ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def run(self, start_step: int = 0) -> str:
        """Train from `start_step` to total_steps. Returns "finished" or "stopped" (signal)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.step = start_step
        if start_step > 0:
            self.last_saved = start_step  # resumed from that checkpoint: never rewrite it (latest points to it)
        stopper = StopRequested()
        self.engine.train()
        if cfg.model.gradient_checkpointing and not gradient_checkpointing_active(self.engine.module):
            raise RuntimeError("model.gradient_checkpointing is on but no module will checkpoint (eval mode?)")
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                   disable=not (self.info.is_main and sys.stderr.isatty()))
        status = "finished"
        while self.step < self.total_steps:
            self._test_hooks()
            m = self.train_step(self.step, stopper.flag)
            self.step += 1
            stop = m.pop("_stop")
            self.logger.log_metrics(self.step, m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", cat=f"{m['cat_loss']:.3f}", refresh=False)
            # The last step always prints: a log's final line then says how the run ended.
            if bar.disable and (self.step % cfg.train.log_every == 0 or self.step == self.total_steps):
                self._say(f"step {self.step}/{self.total_steps} epoch {m['epoch']} loss {m['loss']:.4f} "
                          f"lm {m['lm_loss']:.4f} cat {m['cat_loss']:.4f} amp {m['amplitude']:.3f} lr {m['lr']:.3g} "
                          f"gnorm {m['grad_norm']:.3f} tok/s {m['tokens_per_s']:.0f}")
            if stop:
                self._say(f"stop signal received: saving at step {self.step} and exiting")
                status = "stopped"
                break
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                self.run_eval()
            if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                self.save()
        bar.close()
        if self.last_saved != self.step:
            self.save()
        if status == "finished":
            self.run_eval()
        return status

    def _test_hooks(self) -> None:
        """Fault injection for the engine tests (environment variables, all unset in real runs)."""
        env, rank, step = os.environ, self.info.rank, self.step
        if env.get("CAT_DS_TEST_RAISE_AT") == f"{rank}:{step}":  # "rank:step": this rank raises
            raise RuntimeError(f"CAT_DS_TEST_RAISE_AT: rank {rank} fails at step {step}")
        if env.get("CAT_DS_TEST_SIGKILL_AT") == str(step) and rank == 0:  # rank 0 dies hard
            os.kill(os.getpid(), signal.SIGKILL)
        at, _, signum = env.get("CAT_DS_TEST_SIGNAL_AT", "").partition(":")  # "step:signum" to every rank
        if at == str(step):
            os.kill(os.getpid(), int(signum))

    def _say(self, msg: str) -> None:
        if self.info.is_main:
            print(f"[cat-ds] {msg}", flush=True)
