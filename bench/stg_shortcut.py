"""Where does a trained STG model read its answer from? Two measurements per model:

1. Attention of the answer row (the last prompt token, the row that predicts the label; CAT
   supervises it) per layer and head: mass on the causal items ("Smoking: 4", ...), on their
   spurious twins ("Yellow fingers: 6", ...) and on everything else, averaged over OOD records.
2. OOD accuracy as generated, and again after rewriting each OOD record's twins to agree with
   its causal values as they do in training (int(1.5 x Smoking), Weight, int(0.5 x Exercise)).
   A model that ignores the twins scores the same on both; the gap measures the shortcut.

    .venv/bin/python bench/stg_shortcut.py --data DEMO_OUT/data/stg_M \
        --model DEMO_OUT/runs/stg_M_base_s0/export --model DEMO_OUT/runs/stg_M_cat_s0/export

Used for docs/demo_recipe.md ("Why CAT at alpha 10 can leave the shortcut open").
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_ds.data.records import CatRecord, load_records  # noqa: E402
from cat_ds.data.tokenizers import load_tokenizer  # noqa: E402
from cat_ds.evaluation import run_eval  # noqa: E402

ITEM = re.compile(r"(Smoking|Weight|Exercise|Yellow fingers|Clothing size|Hormones|Certain gene|Room size): (\d+)")
CAUSAL, TWINS = ("Smoking", "Weight", "Exercise"), ("Yellow fingers", "Clothing size", "Hormones")
GROUPS = ("causal", "twins", "rest")


def consistent_twins(rec: CatRecord) -> CatRecord:
    """The record with its twins rewritten the way STG's training split draws them."""
    v = {k: int(x) for k, x in ITEM.findall(rec.input)}
    twins = {"Yellow fingers": int(1.5 * v["Smoking"]), "Clothing size": v["Weight"],
             "Hormones": int(0.5 * v["Exercise"])}
    text = rec.input
    for name, value in twins.items():
        text = re.sub(rf"{name}: \d+", f"{name}: {value}", text)
    return CatRecord(text, rec.target, rec.important)


@torch.no_grad()
def answer_row_mass(model, tok, records: list[CatRecord]) -> torch.Tensor:
    """(layers, heads, 3): mean attention mass of the last prompt token on causal / twins / rest."""
    cfg = model.config
    if cfg._attn_implementation != "eager":  # SDPA and flash kernels return no attention probabilities
        raise ValueError(f"answer_row_mass needs attn_implementation='eager', got {cfg._attn_implementation!r}")
    total = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, 3)
    for rec in records:
        enc = tok(rec.input, return_offsets_mapping=True, add_special_tokens=False)
        group = torch.full((len(enc["input_ids"]),), 2)
        for m in ITEM.finditer(rec.input):
            g = 0 if m.group(1) in CAUSAL else 1 if m.group(1) in TWINS else 2
            for i, (a, b) in enumerate(enc["offset_mapping"]):
                if b > m.start() and a < m.end():
                    group[i] = g
        att = model(input_ids=torch.tensor([enc["input_ids"]]), output_attentions=True).attentions
        for layer, a in enumerate(att):
            row = a[0, :, -1, :]  # heads x T
            for g in range(3):
                total[layer, :, g] += row[:, group == g].sum(-1)
    return total / len(records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an STG data dir (test_ood.jsonl)")
    ap.add_argument("--model", action="append", required=True, help="a saved model dir with its tokenizer (repeatable)")
    ap.add_argument("--attention-records", type=int, default=100, help="OOD records for the attention table")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    ood = load_records(Path(args.data) / "test_ood.jsonl")
    for path in args.model:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        tok = load_tokenizer(path)
        print(f"## {path}")
        # run_eval: the same generation and exact-match scoring as the engine's evaluation
        as_is = run_eval(model, tok, ood, batch_size=200).accuracy
        twins = run_eval(model, tok, [consistent_twins(r) for r in ood], batch_size=200).accuracy
        print(f"OOD accuracy {as_is:.4f}; with consistent twins {twins:.4f}")
        mass = answer_row_mass(model, tok, ood[:args.attention_records])
        print("answer-row attention mass (causal / twins / rest) per head:")
        for layer in range(mass.shape[0]):
            cells = "  ".join(f"h{h} " + "/".join(f"{float(x):.2f}" for x in mass[layer, h]) for h in range(mass.shape[1]))
            print(f"  layer {layer}: {cells}")


if __name__ == "__main__":
    main()
