"""Evaluate a model on a list of records, on one rank or all ranks of a process group.

Sharding under data parallelism / ZeRO-3: record i goes to rank i % world_size; every shard is
padded (with copies of record 0, dropped afterwards) to the same length, so every rank runs
the same number of `generate` calls, each with `synced_gpus=True`: ranks that finish early
keep stepping, which ZeRO-3's collective parameter gathers require. Results are exchanged with
`all_gather_object`, so every rank returns the same `EvalResult` (rank 0 writes/logs it; the
others can still take collective decisions from it, e.g. saving a best checkpoint together).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cat_ds.evaluation.generate import generate_batch, prepare_prompts
from cat_ds.evaluation.scorers import get_scorer


@dataclass
class Prediction:
    input: str
    target: str
    prediction: str
    correct: bool


@dataclass
class EvalResult:
    accuracy: float
    n: int
    correct: int
    predictions: list[Prediction] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "correct": self.correct}


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if world_size > 1 and not initialized:
        raise RuntimeError(f"run_eval: world_size={world_size} but torch.distributed is not initialized")
    return rank, world_size, initialized


def _field(r, name: str) -> str:
    return str(r[name] if isinstance(r, dict) else getattr(r, name))


def run_eval(
    model,
    tokenizer,
    records: Sequence,
    *,
    scorer: str = "exact",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    stop_at_newline: bool | None = None,
    synced_gpus: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    prompt_mode: str = "training",
    prepared: tuple[list[list[int]], int] | None = None,
) -> EvalResult:
    """Greedy-generate a continuation for every record (`CatRecord` or dict with `input` and
    `target`) and score it. Call it on *every* rank when distributed.

    `max_new_tokens=None`: derived from the targets (`prepare_prompts`).
    `stop_at_newline=None`: on unless a target contains a newline or the scorer is gsm8k
    (whose reasoning spans lines). `synced_gpus=None`: on when world_size > 1.
    `prompt_mode`: "training" (prompt ids = training prefix) or "raw" (see `prompt_ids`).
    `prepared`: `prepare_prompts`'s result for these records, so repeated evaluations (every
    `eval.every` steps) tokenise them once."""
    if not records:
        raise ValueError("run_eval: no records to evaluate")
    rank, world_size, _ = _dist_info(rank, world_size)
    score = get_scorer(scorer)
    inputs = [_field(r, "input") for r in records]
    targets = [_field(r, "target") for r in records]
    prompts, budget = prepared or prepare_prompts(tokenizer, list(zip(inputs, targets)), prompt_mode)
    if max_new_tokens is None:
        max_new_tokens = budget
    if stop_at_newline is None:
        stop_at_newline = scorer != "gsm8k" and not any("\n" in t for t in targets)
    if synced_gpus is None:
        synced_gpus = world_size > 1

    n = len(records)
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    mine += [-1] * (per_rank - len(mine))  # -1: padding, generated (for ZeRO-3) and dropped

    was_training = model.training
    model.eval()
    local: list[tuple[int, str]] = []
    try:
        for start in range(0, per_rank, batch_size):
            idx = mine[start:start + batch_size]
            texts = generate_batch(
                model,
                tokenizer,
                [prompts[max(i, 0)] for i in idx],
                max_new_tokens=max_new_tokens,
                stop_at_newline=stop_at_newline,
                synced_gpus=synced_gpus,
            )
            local.extend((i, t) for i, t in zip(idx, texts) if i >= 0)
    finally:
        model.train(was_training)

    if world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, local)
        local = [item for part in gathered for item in part]
    by_index = dict(local)
    preds = []
    for i in range(n):
        p = by_index[i]
        preds.append(Prediction(inputs[i], targets[i], p, bool(score(p, targets[i]))))
    correct = sum(p.correct for p in preds)
    return EvalResult(accuracy=correct / n, n=n, correct=correct, predictions=preds)


def write_predictions(result: EvalResult, path: str | os.PathLike) -> Path:
    """One JSON object per record: input, target, prediction, correct."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for p in result.predictions:
            fh.write(json.dumps(p.__dict__, ensure_ascii=False) + "\n")
    return path
