"""The evaluation callback the engine calls every `eval.every` optimizer steps and at the end.

    evaluator = Evaluator.from_config(cfg, tokenizer)          # on every rank
    out = evaluator(model, step)                                # on every rank (collective)
    logger.log_metrics(step, out.metrics)                       # logger: NullLogger off rank 0
    for f in out.files: logger.log_artifact(f, "predictions")
    if out.is_best: engine.save_checkpoint(...)                 # same decision on every rank

Returns results, never logs. Metrics: `eval/<set>/accuracy`, `eval/<set>/n`,
`eval/<set>/correct` for every named set (`iid`, `ood`, ...) and, with a probe set, the
per-layer attention ratio (`probe/attn_ratio/layer_<l>`, see probe.py). Predictions (input,
target, prediction, correct) go to `<out_dir>/eval/step_<step>/<set>.jsonl` and the attention
pictures of `attention_records` sampled records per set to `<out_dir>/eval/step_<step>/attention/<set>_*`
(rank 0 only; see attention_map.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cat_ds.evaluation.run import EvalResult, _field, run_eval, write_predictions


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    results: dict[str, EvalResult]
    files: list[Path] = field(default_factory=list)
    is_best: bool = False


class Evaluator:
    def __init__(
        self,
        tokenizer,
        sets: Mapping[str, Sequence],
        *,
        out_dir: str | os.PathLike,
        scorer: str = "exact",
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        stop_at_newline: bool | None = None,
        probe_records: Sequence | None = None,
        probe_examples: Sequence | None = None,
        probe_size: int = 16,
        max_length: int | None = 256,
        best_metric: str | None = None,
        best_mode: str = "max",
        attention_records: int = 4,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode: expected 'max' or 'min', got {best_mode!r}")
        for name, recs in sets.items():
            if not recs:
                raise ValueError(f"eval set {name!r} has no records")
        self.tokenizer = tokenizer
        self.sets = dict(sets)
        self.out_dir = Path(out_dir)
        self.kw = dict(scorer=scorer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       stop_at_newline=stop_at_newline)
        self.probe = None
        self.prepared: dict[str, tuple] = {}  # set name -> prompt ids and answer budget, tokenised once per run
        if probe_examples is not None and probe_size:
            from cat_ds.evaluation.probe import probe_from_examples

            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self.probe = probe_from_examples(probe_examples, pad, limit=probe_size)
        elif probe_records:
            from cat_ds.evaluation.probe import probe_batch

            self.probe = probe_batch(tokenizer, probe_records, max_length=max_length, limit=probe_size)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.best_value: float | None = None
        self.attention_records = attention_records  # per set, drawn at every evaluation (attention_map)

    @classmethod
    def from_config(cls, cfg, tokenizer, train_examples: Sequence | None = None) -> "Evaluator | None":
        """From a `cat_ds.config.Config`; None when `data.eval` names no set. `train_examples`: the
        run's tokenised training set, whose first supervised rows make the probe batch (nothing is
        read or tokenised again); without it, the probe tokenises the training records itself."""
        from cat_ds.data.records import load_records

        if not cfg.data.eval:
            return None
        ev = cfg.eval
        limit = getattr(ev, "limit", None)
        cols = getattr(cfg.data, "columns", None)
        sets = {name: load_records(path, columns=cols)[:limit] if limit else load_records(path, columns=cols)
                for name, path in cfg.data.eval.items()}
        probe_size = getattr(ev, "probe_size", 16)
        probe = None
        if probe_size and cfg.data.train and train_examples is None:
            probe = load_records(cfg.data.train, columns=cols)
        if getattr(cfg.data, "chat_template", False):  # prompts exactly as training renders them
            from cat_ds.data.chat import render

            sets = {name: render(recs, tokenizer) for name, recs in sets.items()}
            probe = render(probe, tokenizer) if probe else probe
        return cls(tokenizer, sets, out_dir=cfg.output_dir, scorer=ev.scorer, batch_size=ev.batch_size,
                   max_new_tokens=ev.max_new_tokens, stop_at_newline=getattr(ev, "newline_cut", None),
                   probe_records=probe, probe_examples=train_examples, probe_size=probe_size,
                   max_length=cfg.data.max_length,
                   best_metric=getattr(ev, "best_metric", None), best_mode=getattr(ev, "best_mode", "max"),
                   attention_records=ev.attention_records)

    def __call__(self, model, step: int, *, rank: int | None = None, world_size: int | None = None) -> EvalOutput:
        import torch.distributed as dist

        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        metrics: dict[str, float] = {}
        results: dict[str, EvalResult] = {}
        files: list[Path] = []
        for name, recs in self.sets.items():
            if name not in self.prepared:
                from cat_ds.evaluation.generate import prepare_prompts

                self.prepared[name] = prepare_prompts(self.tokenizer, [(_field(r, "input"), _field(r, "target")) for r in recs])
            res = run_eval(model, self.tokenizer, recs, rank=rank, world_size=world_size, prepared=self.prepared[name],
                           **self.kw)
            results[name] = res
            metrics[f"eval/{name}/accuracy"] = res.accuracy
            metrics[f"eval/{name}/n"] = res.n
            metrics[f"eval/{name}/correct"] = res.correct
            if rank == 0:
                files.append(write_predictions(res, self.out_dir / "eval" / f"step_{step}" / f"{name}.jsonl"))
        if self.probe is not None:
            from cat_ds.evaluation.probe import probe_attention

            metrics.update(probe_attention(model, self.probe))
        if self.attention_records:
            files += self._attention(model, step, rank)
        return EvalOutput(metrics, results, files, self._update_best(metrics))

    def _attention(self, model, step: int, rank: int) -> list[Path]:
        """Where each set's first sampled records look (`cat-ds attention` for this model); every rank
        measures (ZeRO-3 forwards are collective), rank 0 draws and returns the files."""
        from cat_ds.data.records import CatRecord, parse_record
        from cat_ds.evaluation.attention_map import AttentionTable, add_model, sample_indices

        files: list[Path] = []
        for name, recs in self.sets.items():
            sample = [(i, recs[i] if isinstance(recs[i], CatRecord) else parse_record(recs[i], f"{name}[{i}]: "))
                      for i in sample_indices(len(recs), self.attention_records)]
            table = AttentionTable()
            add_model(table, f"step {step}", model, self.tokenizer, sample)
            if rank == 0 and table.records:
                from cat_ds.tracking.attention_plots import draw

                # One folder, the set in each name: a trainer may log every file into one artifact folder.
                files += draw(table, self.out_dir / "eval" / f"step_{step}" / "attention", prefix=f"{name}_")
        return files

    def _update_best(self, metrics: Mapping[str, Any]) -> bool:
        if self.best_metric is None:
            return False
        if self.best_metric not in metrics:
            raise KeyError(f"eval.best_metric {self.best_metric!r} is not among the eval metrics {sorted(metrics)}")
        v = float(metrics[self.best_metric])
        if math.isnan(v):
            return False
        better = self.best_value is None or (v > self.best_value if self.best_mode == "max" else v < self.best_value)
        if better:
            self.best_value = v
        return better

