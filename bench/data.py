"""Data pipeline throughput: raw JSONL -> validated records -> tokens + sparse causal
masks -> collated batches, on STG_H train (3000 records, the longest STG texts).

    .venv/bin/python bench/data.py [--records 3000] [--kind bpe|sentencepiece] [--batch-size 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cat_ds.data.collate import CatCollator
from cat_ds.data.records import load_records
from cat_ds.data.spans import tokenize_example
from cat_ds.data.stg import write_stg
from cat_ds.data.tokenizers import load_tokenizer, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--kind", choices=["bpe", "sentencepiece"], default="bpe")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data-") as d:  # generated here, removed after
        run(args, Path(d))


def run(args, tmp: Path) -> None:
    write_stg(tmp, task="stg_h", train_size=args.records, seed=0, test_size=10)
    tok = train_tokenizer([tmp / "train.jsonl"], args.kind, 1024, tmp / "tok")
    tok = load_tokenizer(tmp / "tok")
    collate = CatCollator(tok.pad_token_id)

    best = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        records = load_records(tmp / "train.jsonl")
        t1 = time.perf_counter()
        examples = [tokenize_example(r, tok, max_length=512) for r in records]
        t2 = time.perf_counter()
        n_batches = 0
        for i in range(0, len(examples), args.batch_size):
            collate(examples[i : i + args.batch_size])
            n_batches += 1
        t3 = time.perf_counter()
        run = (t1 - t0, t2 - t1, t3 - t2, t3 - t0)
        best = run if best is None or run[-1] < best[-1] else best
    load_s, mask_s, collate_s, total_s = best
    n = len(records)
    rows = sum(len(ex.rows) for ex in examples)
    res = {
        "records": n,
        "tokenizer": args.kind,
        "mean_tokens": round(sum(len(e.input_ids) for e in examples) / n, 1),
        "supervised_rows": rows,
        "load_records_per_s": round(n / load_s),
        "mask_records_per_s": round(n / mask_s),
        "collate_records_per_s": round(n / collate_s),
        "end_to_end_records_per_s": round(n / total_s),
        "end_to_end_s": round(total_s, 3),
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
