"""Training data for the engine: records -> cached `datasets.map` tokenisation -> per-rank batches.

Order: epoch e uses a permutation of the whole training set drawn from a generator seeded by
(seed, e). Optimizer step s of the epoch takes the G = micro x accum x world examples
perm[s*G : (s+1)*G] (the tail that does not fill a step is dropped, so every rank runs the
same number of forwards, which ZeRO-3 needs). Micro-batch k = a*world + rank of the step
(a = accumulation index) is perm[s*G + k*micro : ...]. So the content of an optimizer step
depends only on (seed, epoch, step, G): 1 rank x accum 2 sees the same examples as 2 ranks x
accum 1, and the position in the epoch is just the global step (resume needs nothing else).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from cat_ds.data.collate import CatCollator
from cat_ds.data.records import CatRecord, expand_paths, load_records
from cat_ds.data.spans import tokenize_example
from cat_ds.schedule import Schedule

TOKENIZE_VERSION = 1  # bump when spans/tokenisation semantics change (invalidates the cache)
def _fingerprint(files: list, tokenizer, max_length: int, min_gap: int, chat_template: bool = False,
                 columns: dict | None = None) -> str:
    h = hashlib.sha256()
    for f in files:
        if isinstance(f, str):  # a hub dataset: its name (offline runs read the datasets cache)
            h.update(f.encode())
            continue
        h.update(str(f.resolve()).encode())
        for part in sorted(f.rglob("*")) if f.is_dir() else [f]:  # a saved dataset: every file in it
            if part.is_file():
                h.update(hashlib.sha256(part.read_bytes()).digest())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([max_length, min_gap, TOKENIZE_VERSION, tokenizer.eos_token_id]).encode())
    if chat_template:  # (absent otherwise: caches written before the option existed stay valid)
        h.update(json.dumps(["chat", tokenizer.chat_template]).encode())
    if columns:
        h.update(json.dumps(["columns", sorted(columns.items())]).encode())
    return h.hexdigest()[:20]


def tokenize_dataset(paths: list[str], tokenizer, *, max_length: int, min_gap: int, cache_dir: str | Path,
                     chat_template: bool = False, columns: dict | None = None):
    """Validated records (rendered with the chat template if asked) tokenised through `datasets.map`
    into an Arrow file named by a hash of (file contents, tokenizer, max_length, min_gap,
    chat_template): the second run loads it."""
    from datasets import Dataset

    files = expand_paths(paths)
    records = load_records(files, columns=columns)
    if chat_template:
        from cat_ds.data.chat import render

        records = render(records, tokenizer)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    cache_file = cache / f"tokenized-{_fingerprint(files, tokenizer, max_length, min_gap, chat_template, columns)}.arrow"
    raw = Dataset.from_dict({"record": [json.dumps(r.to_json()) for r in records]})

    def fn(ex):
        obj = json.loads(ex["record"])
        rec = CatRecord(obj["input"], obj["target"], [(k, v) for d in obj.get("important") or [] for k, v in d.items()]
                        or None)
        return tokenize_example(rec, tokenizer, max_length=max_length, min_gap=min_gap).to_dict()

    return raw.map(fn, remove_columns=["record"], cache_file_name=str(cache_file), load_from_cache_file=True,
                   desc="tokenise", keep_in_memory=False)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class StepBatches:
    """This rank's micro-batches for any optimizer step (see the module docstring). The schedule
    (cat_ds/schedule.py) owns the global batch and steps per epoch, and was checked before any rank
    started."""

    def __init__(self, dataset, collator: CatCollator, schedule: Schedule, *, rank: int, seed: int):
        if len(dataset) != schedule.num_records:  # a schedule computed for other data: a bug, not bad input
            raise ValueError(f"schedule is for {schedule.num_records} records, the dataset has {len(dataset)}")
        self.ds, self.collate, self.schedule = dataset, collator, schedule
        self.micro, self.accum, self.world = schedule.micro_batch, schedule.grad_accum, schedule.world_size
        self.rank, self.seed = rank, seed
        self.global_batch, self.steps_per_epoch = schedule.global_batch, schedule.steps_per_epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of global optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> list[list[int]]:
        epoch, pos = self.position(step)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(len(self.ds), self.seed, epoch))
        perm = self._perm[1]
        base = pos * self.global_batch
        out = []
        for a in range(self.accum):
            k = a * self.world + self.rank
            out.append(perm[base + k * self.micro: base + (k + 1) * self.micro].tolist())
        return out

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for idx in self.indices(step):
            cols = self.ds[idx]  # one Arrow read per micro-batch: a dict of lists
            out.append(self.collate([{k: v[j] for k, v in cols.items()} for j in range(len(idx))]))
        return out


def default_cache_dir(output_dir: str) -> str:
    return os.path.join(output_dir, ".cache")
