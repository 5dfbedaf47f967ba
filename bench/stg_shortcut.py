"""Where does a trained STG model read its answer from? Three measurements per model:

1. Attention of the answer row (the last prompt token, the row that predicts the label; CAT
   supervises it) per layer and head: mass on the causal items ("Smoking: 4", ...), on their
   spurious twins ("Yellow fingers: 6", ...) and on everything else, averaged over OOD records.
2. OOD accuracy as generated, and again after rewriting each OOD record's twins to agree with
   its causal values as they do in training (int(1.5 x Smoking), Weight, int(0.5 x Exercise)).
   A model that ignores the twins scores the same on both; the gap measures the shortcut.
3. Twin knock-out, on IID and OOD: teacher-forced accuracy (the label of highest
   log-probability among High / Middle / Low Risk) as is, with the answer rows (the prompt's
   last token and the label's) unable to attend to the twins' tokens, and with no token at all
   able to (an additive mask in every layer). If blinding the answer rows changes little but
   blinding every token changes a lot, the twins reach the answer through other positions, where
   CAT does not look; on OOD (twins independent of the label) the all-rows figure is the
   accuracy from the causal values alone.

    .venv/bin/python bench/stg_shortcut.py --data DEMO_OUT/data/stg_M \
        --model DEMO_OUT/runs/stg_M_base_s0/export --model DEMO_OUT/runs/stg_M_cat_s0/export
    .venv/bin/python bench/stg_shortcut.py --model smollm2-135m-instruct   # the untrained reference

DEMO_OUT is the `--out` of a `cat-ds demo` run (default demo_out), which trains and exports both
models. `--data` defaults to data/stg_m (generated if missing, as `cat-ds train` does); `--model`
also takes a .gguf or a named model (converted once, like the engine's models).

Used for docs/demo_recipe.md ("Why it is a lottery" and "Per-layer and per-head constraints, and
a twin knock-out").
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_ds.choices import STG_TWINS, stg_twin_value  # noqa: E402
from cat_ds.data.records import CatRecord, load_records  # noqa: E402
from cat_ds.data.spans import tokenize_example  # noqa: E402
from cat_ds.data.tokenizers import load_tokenizer  # noqa: E402
from cat_ds.evaluation import run_eval  # noqa: E402

ITEM = re.compile(r"(Smoking|Weight|Exercise|Yellow fingers|Clothing size|Hormones|Certain gene|Room size): (\d+)")
TWINS = tuple(STG_TWINS)
CAUSAL = tuple(cause for cause, _ in STG_TWINS.values())
GROUPS = ("causal", "twins", "rest")  # the values of token_groups: 0, 1, 2
LABELS = ("High Risk", "Middle Risk", "Low Risk")
KNOCKOUTS = ("none", "answer_rows", "all_rows")


def token_groups(tok, text: str) -> tuple[list[int], torch.Tensor]:
    """`text` tokenised without specials, and per token its group: 0 causal item, 1 twin, 2 other."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    group = torch.full((len(enc["input_ids"]),), 2)
    for m in ITEM.finditer(text):
        g = 0 if m.group(1) in CAUSAL else 1 if m.group(1) in TWINS else 2
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > m.start() and a < m.end():
                group[i] = g
    return enc["input_ids"], group


def consistent_twins(rec: CatRecord) -> CatRecord:
    """The record with its twins rewritten the way STG's training split draws them."""
    v = {k: int(x) for k, x in ITEM.findall(rec.input)}
    twins = {twin: stg_twin_value(v[cause], f) for twin, (cause, f) in STG_TWINS.items()}
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
        ids, group = token_groups(tok, rec.input)
        att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        for layer, a in enumerate(att):
            row = a[0, :, -1, :]  # heads x T
            for g in range(3):
                total[layer, :, g] += row[:, group == g].sum(-1)
    return total / len(records)


@torch.no_grad()
def label_scores(model, tok, rec: CatRecord, knockout: str) -> list[float]:
    """Teacher-forced log-probability of each of LABELS (EOS excluded) after `rec.input`, with the
    twins' tokens hidden from the answer rows or from every token (KNOCKOUTS)."""
    if knockout not in KNOCKOUTS:
        raise ValueError(f"knockout: expected one of {KNOCKOUTS}, got {knockout!r}")
    input_ids, groups = token_groups(tok, rec.input)
    scores = []
    for label in LABELS:
        ex = tokenize_example(CatRecord(rec.input, label, None), tok)  # the training tokenisation
        ids, start = torch.tensor([ex.input_ids]), ex.answer_start
        if ex.input_ids[:start] != input_ids[:start]:
            raise ValueError("label_scores: the training tokenisation does not start with the input's own tokens "
                             "(a BOS token?), so the twins' positions would be misread")
        n = ids.shape[1]
        blocked = torch.ones(n, n).triu(1).bool()  # causal
        # Token groups from the prompt's tokens (the label holds no items); the label's are "rest".
        twins = torch.cat([groups[:start], torch.full((n - start,), 2)]) == 1
        if knockout == "answer_rows":
            blocked[start - 1:, twins] = True
        elif knockout == "all_rows":
            blocked[~twins[:, None] & twins[None, :]] = True  # twins' own rows still see their prefix
        mask = torch.zeros(1, 1, n, n, dtype=model.dtype).masked_fill(blocked, torch.finfo(model.dtype).min)
        logp = model(input_ids=ids, attention_mask=mask).logits[0].float().log_softmax(-1)
        scores.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(start, n - 1)))  # t predicted at t - 1
    return scores


def knockout_accuracy(model, tok, records: list[CatRecord], knockout: str) -> float:
    """Share of records whose highest-scoring label (label_scores) is the target."""
    hits = 0
    for rec in records:
        scores = label_scores(model, tok, rec, knockout)
        hits += LABELS[max(range(len(LABELS)), key=scores.__getitem__)] == rec.target
    return hits / len(records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/stg_m", help="an STG data dir (test_iid.jsonl, test_ood.jsonl)")
    ap.add_argument("--model", action="append", required=True,
                    help="a saved model dir with its tokenizer, a .gguf or a named model (repeatable)")
    ap.add_argument("--eval-records", type=int, default=None, help="OOD records generated (default: all)")
    ap.add_argument("--attention-records", type=int, default=100, help="OOD records for the attention table")
    ap.add_argument("--knockout-records", type=int, default=400, help="IID and OOD records for the twin knock-out")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from cat_ds.data.stg import ensure_stg
    from cat_ds.sources import resolve

    torch.set_num_threads(1)
    ensure_stg([str(Path(args.data) / f"test_{s}.jsonl") for s in ("iid", "ood")], generate=True)
    ood = load_records(Path(args.data) / "test_ood.jsonl")
    iid = load_records(Path(args.data) / "test_iid.jsonl")
    for spec in args.model:
        path = resolve(spec)  # a directory as given; a .gguf or a named model converted once into the cache
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        tok = load_tokenizer(path)
        print(f"## {spec}")
        # run_eval: the same generation and exact-match scoring as the engine's evaluation
        gen = ood[:args.eval_records]
        as_is = run_eval(model, tok, gen, batch_size=200).accuracy
        twins = run_eval(model, tok, [consistent_twins(r) for r in gen], batch_size=200).accuracy
        print(f"OOD accuracy {as_is:.4f}; with consistent twins {twins:.4f}")
        for split, recs in (("IID", iid), ("OOD", ood)):
            recs = recs[:args.knockout_records]
            ko = {k: knockout_accuracy(model, tok, recs, k) for k in KNOCKOUTS}
            print(f"teacher-forced {split} accuracy on {len(recs)} records: as is {ko['none']:.4f}; answer rows "
                  f"blind to the twins {ko['answer_rows']:.4f}; every token blind to the twins {ko['all_rows']:.4f}")
        mass = answer_row_mass(model, tok, ood[:args.attention_records])
        print("answer-row attention mass (causal / twins / rest) per head:")
        for layer in range(mass.shape[0]):
            cells = "  ".join(f"h{h} " + "/".join(f"{float(x):.2f}" for x in mass[layer, h]) for h in range(mass.shape[1]))
            print(f"  layer {layer}: {cells}")


if __name__ == "__main__":
    main()
