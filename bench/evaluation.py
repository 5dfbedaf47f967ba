"""Evaluation throughput: greedy generation + exact-match scoring (`run_eval`, the code behind
the IID/OOD callbacks and `cat-ds eval`) on STG test records, one process.

    .venv/bin/python bench/evaluation.py [--model DIR | --model-config configs/models/demo_llama.json]
        [--task stg|stg_h] [--records 400] [--batch-sizes 1,16,100] [--device cpu|cuda] [--json]

`--model DIR`: a trained export (e.g. a demo run's `export/`, tokenizer included), a .gguf file
or a named model (`smollm2-135m-instruct`); an export answers
and stops at the newline like a real evaluation. Without it: a random-init model from
`--model-config` with a freshly trained tokenizer: garbage answers, stopping wherever it
happens to emit EOS or a newline (a throughput figure, not an accuracy one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cat_ds.data.records import load_records
from cat_ds.data.stg import write_stg
from cat_ds.data.tokenizers import load_tokenizer, train_tokenizer
from cat_ds.evaluation import run_eval
from cat_ds.evaluation.generate import default_max_new_tokens

REPO = Path(__file__).resolve().parents[1]


def load_model(args, data_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.model:
        from cat_ds.sources import resolve

        src = resolve(args.model)  # a directory, a .gguf or a named model (smollm2-135m-instruct)
        tok = load_tokenizer(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    else:
        tok = train_tokenizer([data_dir / "train.jsonl"], "bpe", 512, data_dir / "tok")
        tok = load_tokenizer(data_dir / "tok")
        cfg = AutoConfig.for_model(**json.loads(Path(args.model_config).read_text()))
        cfg.vocab_size = len(tok)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.set_attn_implementation("sdpa")
    return model.to(args.device).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a saved model dir with its tokenizer, a .gguf or a named model "
                    "(default: random init)")
    ap.add_argument("--model-config", default=str(REPO / "configs/models/demo_llama.json"))
    ap.add_argument("--task", choices=["stg", "stg_h"], default="stg")
    ap.add_argument("--split", choices=["iid", "ood"], default="ood")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--batch-sizes", default="1,16,100")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_eval-") as d:  # generated here, removed after
        run(args, Path(d))


def run(args, data_dir: Path) -> None:
    write_stg(data_dir, task=args.task, train_size=2000, seed=0, test_size=args.records)
    records = load_records(data_dir / f"test_{args.split}.jsonl")
    model, tok = load_model(args, data_dir)
    budget = default_max_new_tokens(tok, [(r.input, r.target) for r in records])
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        best, res = None, None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = run_eval(model, tok, records, batch_size=bs)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        rows.append({"batch_size": bs, "records": len(records), "seconds": round(best, 3),
                     "records_per_s": round(len(records) / best, 1), "accuracy": res.accuracy,
                     "max_new_tokens": budget})
    # Batched generation (one KV cache per batch) against one record at a time, same run.
    ratio = rows[-1]["records_per_s"] / rows[0]["records_per_s"] if rows[0]["batch_size"] == 1 else None
    out = {"task": args.task, "batched_over_one_by_one": ratio, "split": args.split, "device": args.device, "dtype": args.dtype,
           "model": args.model or args.model_config, "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.task} {args.split}, {len(records)} records, model {out['model']}, {args.device} {args.dtype}, "
          f"{out['torch_threads']} threads, max_new_tokens {budget}")
    print("| batch | seconds | records/s | accuracy |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['seconds']} | {r['records_per_s']} | {100 * r['accuracy']:.1f} % |")
    if ratio:
        print(f"batch {rows[-1]['batch_size']} over batch 1: {ratio:.2f}x records/s")


if __name__ == "__main__":
    main()
