"""Replay the first optimizer steps of an engine run in one plain PyTorch process and compare them,
step by step, with the run's own metrics: the check that the engine (DeepSpeed ZeRO-3, any number
of ranks) computes what a single-process training loop computes.

    .venv/bin/python bench/engine_replay.py RUN_DIR [--init MODEL_DIR] [--steps 12]

RUN_DIR is a finished or running `cat-ds train` output dir (its `config.yaml`, `ds_config.json` and
`metrics.jsonl`, which has every step). MODEL_DIR holds the run's initial weights as a Hugging Face
model dir (default: the run's `model.name_or_path`; a random-init run's draw can be had by training
it with `train.max_steps=2`, whose two steps DeepSpeed runs at lr 0, and exporting it). The replay
takes each rank's micro-batches from the engine's own data order (`StepBatches`), averages the
micro-batch losses as DeepSpeed averages gradients, clips, and steps torch's AdamW with the
ds_config's hyper-parameters at the learning rate the run logged for that step. LM-only runs
(cat.enabled false, train.lm_normalization micro). Prints step, the run's and the replay's loss and gradient norm, and the worst
relative difference; docs/demo_recipe.md ("The engine's pre-training is the search's") used it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cat_ds.config import load_config  # noqa: E402
from cat_ds.data.collate import CatCollator  # noqa: E402
from cat_ds.data.tokenizers import load_tokenizer  # noqa: E402
from cat_ds.engine.data import StepBatches, tokenize_dataset  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--init", help="initial weights (HF dir); default: the run's model.name_or_path")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    cfg = load_config(args.run_dir / "config.yaml")
    ds = json.loads((args.run_dir / "ds_config.json").read_text())
    if cfg.cat.enabled or cfg.train.lm_normalization != "micro":
        raise SystemExit(f"{args.run_dir}: the replay covers LM-only runs with train.lm_normalization micro")
    init = args.init or cfg.model.name_or_path
    if not init:
        raise SystemExit(f"{args.run_dir}: random-init run; pass --init with its initial weights (see --help)")
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lm_loss" in r][: args.steps]
    t = cfg.train
    world = ds["train_batch_size"] // (t.micro_batch_size * t.grad_accum)
    scale = world * t.grad_accum  # DeepSpeed averages the micro-batch gradients over ranks x accumulation
    tok = load_tokenizer(cfg.model.tokenizer or init)
    with tempfile.TemporaryDirectory() as cache:
        data = tokenize_dataset(cfg.data.train, tok, max_length=cfg.data.max_length, min_gap=cfg.cat.min_gap,
                                cache_dir=cache)
        ranks = [StepBatches(data, CatCollator(tok.pad_token_id), micro=t.micro_batch_size, accum=t.grad_accum,
                             world=world, rank=r, seed=t.seed) for r in range(world)]
        model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        model.train()
        p = ds["optimizer"]["params"]
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                                weight_decay=p["weight_decay"])
        worst = 0.0
        print(f"{'step':>4} {'lr':>9} {'run loss':>10} {'replay':>10} {'run gnorm':>10} {'replay':>10}")
        for r in rows:
            step = r["step"] - 1  # metrics count completed steps
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for rank in ranks:
                for mb in rank.step(step):
                    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"])
                    (out.loss / scale).backward()
                    loss += float(out.loss.detach()) / scale
            clip = ds.get("gradient_clipping") or float("inf")  # 0: DeepSpeed does not clip
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            for g in opt.param_groups:
                g["lr"] = r["lr"]
            opt.step()
            worst = max(worst, abs(loss - r["lm_loss"]) / abs(r["lm_loss"]),
                        abs(gnorm - r["grad_norm"]) / r["grad_norm"])
            print(f"{step:>4} {r['lr']:>9.3g} {r['lm_loss']:>10.5f} {loss:>10.5f} "
                  f"{r['grad_norm']:>10.4f} {gnorm:>10.4f}", flush=True)
    print(json.dumps({"steps": len(rows), "world": world, "max_rel_diff": worst}))


if __name__ == "__main__":
    main()
