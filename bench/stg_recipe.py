"""Recipe exploration for the CPU demo: base vs CAT on STG, one process, plain PyTorch.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stg_recipe.py [--modes base,cat --seeds 0,1,2 ...]

Defaults are the issue-9 calibration (from scratch, 60 epochs, batch 32, lr 2e-3, alpha 2).
The recommended demo recipe (docs/demo_recipe.md, R10) is
    --pretrain-steps 600 --epochs 20 --batch-size 8 --lr 1e-3 --alpha 10 --seeds 0,1,2

Steps: generate STG (`write_stg`), train a byte-level BPE tokenizer, optionally pre-train a
tiny Llama-shaped model once on generic synthetic "numbers" text (see `numbers_record`), then
for every (mode, seed) fine-tune on STG train with
  base: LM loss on the answer tokens;
  cat:  LM loss + amplitude x Re-Attention loss (cat_ds.reattention, "cat_sdpa" attention),
and evaluate greedy IID / OOD exact-match accuracy exactly like cat_ds.evaluation (prompt =
training prefix, left padding, stop at EOS), plus the mean causal/non-causal attention ratio
a1/a0 of the answer rows (teacher forced, all layers and heads, as the loss defines it) and
`ood_conflict`: accuracy on the OOD records whose label differs from the one the spurious twins
imply (Smoking ~ fingers/1.5, Weight ~ clothing, Exercise ~ 2 x hormones + 0.5), a direct read
of the shortcut (a model reading only the twins scores 0 there).
Prints one JSON line per run and a summary line per mode. This is an exploration tool; the
demo itself runs through the engine (cat_ds/engine) with the recipe ported to its config.

The pre-training text never contains STG's twin structure: every value is an independent
uniform 1..10. `--pretrain-task questions`: the question names the items it is about (lookups,
comparisons, thresholds of one value or of a sum); `rules`: 32 fixed weighted-sum threshold
rules, each named by a "Task 1xx." header. The aim is a model that arrives able to read
"Word: value" and compare numbers, as a pretrained LLM does, without having seen any correlation
between items. `--pretrain-names generic+stg` adds the eight STG item names (still with
independent values) to the generic name pool. The pre-trained weights are cached under --out.
See docs/demo_recipe.md for what was measured with this script.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cat_ds.data.collate import CatCollator  # noqa: E402
from cat_ds.data.numbers import GENERIC_NAMES, numbers_record  # noqa: E402
from cat_ds.data.records import CatRecord, load_records  # noqa: E402
from cat_ds.data.spans import tokenize_example  # noqa: E402
from cat_ds.data.stg import STG_NAMES, stg_label, write_stg  # noqa: E402
from cat_ds.data.tokenizers import load_tokenizer  # noqa: E402
from cat_ds.demo import train_stg_tokenizer  # noqa: E402
from cat_ds.evaluation.generate import generate_batch, prompt_ids  # noqa: E402
from cat_ds.reattention import CatContext, amplitude, log_stats, reattention_loss, select  # noqa: E402

# ------------------------------------------------------------------ generic pre-training text


def make_rules(rng: random.Random, names: list[str], n_rules: int) -> list[tuple[list[str], list[float], float]]:
    """Fixed threshold rules "w1 x A + w2 x B (+ w3 x C) > t", t at the median of the score."""
    rules = []
    for _ in range(n_rules):
        chosen = rng.sample(names, rng.randint(2, 3))
        weights = [rng.choice([-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0]) for _ in chosen]
        scores = sorted(sum(w * rng.randint(1, 10) for w in weights) for _ in range(501))
        rules.append((chosen, weights, scores[250]))
    return rules


def rule_record(rng: random.Random, names: list[str], rules) -> CatRecord:
    """One example of a fixed rule named by its header ("Task 1xx."): 6-8 independent items that
    include the rule's items; the answer is whether the rule's weighted sum passes its threshold."""
    k = rng.randrange(len(rules))
    chosen, weights, t = rules[k]
    others = rng.sample([n for n in names if n not in chosen], rng.randint(6, 8) - len(chosen))
    items = chosen + others
    rng.shuffle(items)
    vals = {n: rng.randint(1, 10) for n in items}
    a = "Yes" if sum(w * vals[n] for n, w in zip(chosen, weights)) > t else "No"
    return CatRecord(f"Task {100 + k}. Here is some data. " + ", ".join(f"{n}: {vals[n]}" for n in items) + " Answer: ",
                     a, None)


def numbers_corpus(n: int, seed: int, names: list[str], kind: str = "questions", n_rules: int = 32,
                   rule_seed: int = 0, kind_weights: tuple[float, ...] | None = None,
                   questions: int = 1, annotate: bool = False) -> list[CatRecord]:
    """`questions`: `numbers_record`; `rules`: `rule_record` over `n_rules` fixed rules; `mix`: half each."""
    rng = random.Random(f"cat-ds/numbers/{seed}")
    rules = make_rules(random.Random(f"cat-ds/rules/{rule_seed}"), names, n_rules)
    out = []
    for i in range(n):
        use_rule = kind == "rules" or (kind == "mix" and i % 2 == 1)
        out.append(rule_record(rng, names, rules) if use_rule else numbers_record(rng, names, kind_weights, questions,
                                                                                           annotate))
    return out


# ------------------------------------------------------------------ model, training
def build_model(args, tok, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn or 4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.set_attn_implementation("cat_sdpa")  # without a CatContext it is plain SDPA
    return model


def lr_lambda(total: int, warmup: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # cosine to 10%
    return f


def train(model, examples, collate, *, epochs: int, lr: float, batch_size: int, seed: int, args, cat: bool,
          tag: str, alpha: float | None = None) -> dict:
    """AdamW over `examples`; with `cat`, adds amplitude x Re-Attention loss (`alpha`, default
    --alpha). Returns last-epoch means."""
    alpha = args.alpha if alpha is None else alpha
    cfgm = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(args.warmup * total), args.schedule))
    g = torch.Generator().manual_seed(seed)
    model.train()
    step, stats = 0, {}
    for epoch in range(epochs):
        lm_sum = cat_sum = ratio_sum = window = 0.0
        nb = 0
        for idx in torch.randperm(len(examples), generator=g).split(batch_size):
            batch = collate([examples[i] for i in idx])
            ctx = None
            if cat and batch["cat_rows"].shape[0]:
                layers, heads = select(cfgm.num_hidden_layers, cfgm.num_attention_heads, layers=args.cat_layers,
                                       heads=args.cat_heads, seed=seed, step=step)
                ctx = CatContext.from_batch(batch, layers=layers, heads=heads, num_heads=cfgm.num_attention_heads)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
            logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            loss = lm
            if ctx is not None:
                res = reattention_loss(ctx, alpha=alpha, loss_type=args.loss_type,
                                       granularity=args.cat_granularity)
                amp = args.amp * amplitude(args.amp_schedule, decay=args.amp_decay, epoch=epoch, step=step,
                                           steps_per_epoch=steps_per_epoch, value=1.0)
                loss = lm + amp * res.loss
                cat_sum += float(res.loss.detach())
                ratio_sum += float(res.ratio[res.counted].detach().mean()) if res.num_counted else float("nan")
            if not torch.isfinite(loss):  # e.g. `div` with a0 underflowing to 0 at a high alpha: stop, report it
                return {"lm_loss": float("nan"), "cat_loss": None, "train_ratio": None, "diverged_step": step}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if not torch.isfinite(grad_norm):  # a NaN gradient (see above) would poison the weights
                return {"lm_loss": float("nan"), "cat_loss": None, "train_ratio": None, "diverged_step": step}
            opt.step()
            sched.step()
            step += 1
            lm_sum += float(lm.detach())
            window += float(lm.detach())
            nb += 1
            if args.verbose and epochs == 1 and step % 100 == 0:  # mean of the last 100 steps
                print(f"[{tag}] step {step} lm_loss={window / 100:.4f}", file=sys.stderr, flush=True)
                window = 0.0
        stats = {"lm_loss": lm_sum / nb, "cat_loss": cat_sum / nb if cat else None,
                 "train_ratio": ratio_sum / nb if cat else None}
        if args.verbose and (epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1):
            print(f"[{tag}] epoch {epoch} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items() if v is not None),
                  file=sys.stderr, flush=True)
    return stats | {"diverged_step": None}


# ------------------------------------------------------------------ evaluation
_VAL = re.compile(r"(Smoking|Weight|Exercise|Yellow fingers|Clothing size|Hormones): (\d+)")


def spurious_label(rec: CatRecord) -> str:
    """The label the twins imply (what a model reading only the twins would answer)."""
    v = {k: int(x) for k, x in _VAL.findall(rec.input)}
    s = 1.2 * (v["Yellow fingers"] / 1.5) + 0.7 * v["Clothing size"] - (2 * v["Hormones"] + 0.5)
    return "High Risk" if s > 7.2 else "Low Risk"


@torch.no_grad()
def evaluate(model, tok, records, batch_size: int = 200, stg: bool = True) -> dict:
    """Greedy exact match (cat_ds.evaluation semantics) and the share matching the twins' label."""
    model.eval()
    preds = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [prompt_ids(tok, r.input, r.target) for r in chunk]
        preds += generate_batch(model, tok, prompts, max_new_tokens=6)
    acc = sum(p == str(r.target) for p, r in zip(preds, records)) / len(records)
    if not stg:
        return {"acc": acc}
    conflict = [(p, r) for p, r in zip(preds, records) if spurious_label(r) != str(r.target)]
    c_acc = sum(p == str(r.target) for p, r in conflict) / len(conflict) if conflict else float("nan")
    return {"acc": acc, "conflict_acc": c_acc, "conflict_n": len(conflict)}


@torch.no_grad()
def probe_by_kind(model, tok, names: list[str], n: int = 500) -> dict[str, float]:
    """Greedy accuracy per question kind on `n` fresh one-question numbers records (the first
    answer only, so a model pre-trained with several questions per record is judged the same way)."""
    model.eval()
    rng = random.Random("cat-ds/probe-kinds")
    records = [numbers_record(rng, names) for _ in range(n)]
    preds = []
    for i in range(0, n, 250):
        chunk = records[i:i + 250]
        preds += generate_batch(model, tok, [prompt_ids(tok, r.input, r.target) for r in chunk], max_new_tokens=4)
    hits: dict[str, list[bool]] = {}
    for p, r in zip(preds, records):
        q = r.input.split("Question: ")[1]
        kind = ("sum" if q.startswith("What") else "sum_threshold") if " plus " in q else \
            "lookup" if q.startswith("What") else "compare" if " greater than " in q else "threshold"
        hits.setdefault(kind, []).append(p.split(".")[0].strip() == r.target)
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}


@torch.no_grad()
def attention_ratio(model, examples, collate, batch_size: int = 100) -> float:
    """Mean a1/a0 over the answer rows (teacher forced), all layers and heads."""
    model.eval()
    cfg = model.config
    ratios = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size])
        ctx = CatContext.from_batch(batch, layers=list(range(cfg.num_hidden_layers)), num_heads=cfg.num_attention_heads)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
        st = log_stats(ctx)
        ratios += [a1 / a0 for _, a1, a0 in st["row_stats"]]
    return sum(ratios) / len(ratios)


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--out", default="/tmp/stg_recipe", help="data, tokenizer and pre-trained checkpoint cache")
    a("--size", default="M", choices=["S", "M", "L"])
    a("--classes", default="paper", choices=["paper", "two", "three"])
    a("--data-seed", type=int, default=0)
    a("--vocab", type=int, default=512)
    a("--modes", default="base,cat")
    a("--seeds", default="0")
    a("--threads", type=int, default=1)
    # model
    a("--layers", type=int, default=3)
    a("--hidden", type=int, default=128)
    a("--heads", type=int, default=4)
    a("--ffn", type=int, default=0, help="intermediate size (0: 4 x hidden)")
    # fine-tuning
    a("--epochs", type=int, default=60)
    a("--lr", type=float, default=2e-3)
    a("--batch-size", type=int, default=32)
    a("--weight-decay", type=float, default=0.0)
    a("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    a("--schedule", default="cosine", choices=["cosine", "constant"])
    a("--clip", type=float, default=1.0)
    # CAT
    a("--alpha", type=float, default=2.0)
    a("--loss-type", default="div", choices=["div", "div2", "nll", "hinge"])
    a("--amp", type=float, default=1.0, help="amplitude multiplier")
    a("--amp-schedule", default="constant", choices=["constant", "exp", "exp_step"])
    a("--amp-decay", type=float, default=1.0)
    a("--cat-layers", default="all", help="'all', 'last N' or indices")
    a("--cat-heads", default="all", help="'all' or K heads sampled per step")
    a("--cat-granularity", default="all", choices=["all", "layer", "head"],
      help="all: the spec's one average over layers and heads; layer / head: each must pass alpha")
    # generic pre-training (shared by every run: one "pretrained model")
    a("--pretrain-steps", type=int, default=0, help="0: train from scratch")
    a("--pretrain-lr", type=float, default=2e-3)
    a("--pretrain-batch-size", type=int, default=64)
    a("--pretrain-names", default="generic", choices=["generic", "generic+stg", "generic1"],
      help="generic1: only the generic names that are one token")
    a("--pretrain-seed", type=int, default=0)
    a("--pretrain-task", default="questions", choices=["questions", "rules", "mix"])
    a("--pretrain-kinds", default="", help="weights of the question kinds (lookup, compare, threshold, "
                                            "sum_threshold, sum), e.g. 4,1,1,1,1; empty: uniform")
    a("--pretrain-questions", type=int, default=1, help="questions per pre-training record (numbers_record)")
    a("--pretrain-cat-alpha", type=float, default=0.0,
      help="> 0: annotate each pre-training question's answer with the items it names and pre-train with the "
           "Re-Attention loss at this alpha (the fine-tuning's --cat-* settings); needs --pretrain-questions 1")
    a("--pretrain-rules", type=int, default=32, help="number of fixed rules for --pretrain-task rules/mix")
    a("--eval-train", action="store_true", help="also report train accuracy")
    a("--init-from", help="a saved model dir with its tokenizer (e.g. a demo's runs/pretrain/export): every run "
                           "starts from it; no tokenizer training, no --pretrain-steps")
    a("--save-dir", help="save every fine-tuned model (with its tokenizer) to SAVE_DIR/<mode>_s<seed>, e.g. for "
                         "bench/stg_shortcut.py")
    a("--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.pretrain_cat_alpha and args.pretrain_questions != 1:
        raise SystemExit("--pretrain-cat-alpha needs --pretrain-questions 1 (the annotation covers one question)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.time()
    data_dir = out / f"stg_{args.size}_{args.classes}_{args.data_seed}"
    if not (data_dir / "meta.json").exists():
        write_stg(data_dir, task="stg", train_size=args.size, seed=args.data_seed, classes=args.classes)
    names = GENERIC_NAMES + (STG_NAMES if args.pretrain_names == "generic+stg" else [])
    tok_dir = Path(args.init_from) if args.init_from else out / f"tok_{args.vocab}"
    if args.init_from and (args.pretrain_steps or not (tok_dir / "tokenizer.json").exists()):
        raise SystemExit(f"--init-from {tok_dir}: needs a model dir with its tokenizer, and no --pretrain-steps")
    if not (tok_dir / "tokenizer.json").exists():  # same tokenizer for every run, and as the demo's
        train_stg_tokenizer(data_dir, tok_dir, out / "numbers_for_tokenizer.txt", args.vocab)
    tok = load_tokenizer(tok_dir)
    if args.pretrain_names == "generic1":
        names = [n for n in GENERIC_NAMES if len(tok(" " + n, add_special_tokens=False)["input_ids"]) == 1]
    collate = CatCollator(tok.pad_token_id)
    recs = {s: load_records(data_dir / f"{s}.jsonl") for s in ("train", "test_iid", "test_ood")}
    train_ex = [tokenize_example(r, tok) for r in recs["train"]]
    ood_ex = [tokenize_example(r, tok) for r in recs["test_ood"]]
    prep_s = time.time() - t0

    pre_state, pre_s = None, 0.0
    kinds = tuple(float(w) for w in args.pretrain_kinds.split(",")) if args.pretrain_kinds else None
    if args.pretrain_steps:
        key = json.dumps([args.pretrain_steps, args.pretrain_lr, args.pretrain_batch_size, args.pretrain_names,
                          args.pretrain_seed, args.pretrain_task, args.pretrain_rules, args.layers, args.hidden,
                          args.heads, args.ffn, args.vocab, args.weight_decay, args.warmup, args.schedule, args.clip]
                         + ([args.pretrain_kinds] if args.pretrain_kinds else [])
                         + ([args.pretrain_questions] if args.pretrain_questions > 1 else [])
                         + ([["cat", args.pretrain_cat_alpha, args.loss_type, args.cat_granularity, args.cat_layers,
                              args.cat_heads, args.amp, args.amp_schedule, args.amp_decay]]
                            if args.pretrain_cat_alpha else []))  # old cache keys stay valid
        ckpt = out / f"pretrained_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
        if ckpt.exists():
            pre_state = torch.load(ckpt)
            pre_s = float(json.loads((ckpt.with_suffix(".json")).read_text())["pretrain_s"])
        else:
            t1 = time.time()
            model = build_model(args, tok, args.pretrain_seed)
            n = args.pretrain_steps * args.pretrain_batch_size
            pre_ex = [tokenize_example(r, tok) for r in numbers_corpus(n, args.pretrain_seed, names, args.pretrain_task,
                                                                   args.pretrain_rules, args.pretrain_seed, kinds,
                                                                   args.pretrain_questions,
                                                                   annotate=bool(args.pretrain_cat_alpha))]
            st = train(model, pre_ex, collate, epochs=1, lr=args.pretrain_lr, batch_size=args.pretrain_batch_size,
                       seed=args.pretrain_seed, args=args, cat=bool(args.pretrain_cat_alpha), tag="pretrain",
                       alpha=args.pretrain_cat_alpha)
            pre_s = time.time() - t1
            pre_state = model.state_dict()
            torch.save(pre_state, ckpt)
            probe = numbers_corpus(400, args.pretrain_seed + 1000, names, args.pretrain_task, args.pretrain_rules,
                                   args.pretrain_seed)  # unseen examples of the same rules
            pre_acc = evaluate(model, tok, probe, stg=False)["acc"]
            ckpt.with_suffix(".json").write_text(json.dumps({"pretrain_s": pre_s, "lm_loss": st["lm_loss"],
                                                             "probe_acc": pre_acc, "key": key}) + "\n")
            print(json.dumps({"pretrain": True, "steps": args.pretrain_steps, "lm_loss": round(st["lm_loss"], 4),
                              "probe_acc": pre_acc, "pretrain_s": round(pre_s, 1)}), flush=True)

    modes = [m for m in args.modes.split(",") if m]  # --modes "": pre-train (or load) and probe only
    if (pre_state is not None or args.init_from) and not modes:
        # --modes "": probe the pre-trained checkpoint (or the --init-from model) by question kind
        if args.init_from:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.init_from)
        else:
            model = build_model(args, tok, 0)
            model.load_state_dict(pre_state)
        print(json.dumps({"probe_by_kind": {"names": args.pretrain_names, **probe_by_kind(model, tok, names)},
                          "probe_by_kind_stg_names": probe_by_kind(model, tok, STG_NAMES)}), flush=True)

    cfg_echo = {k: v for k, v in vars(args).items() if k not in ("out", "verbose", "modes", "seeds")}
    results: dict[str, list[dict]] = {}
    for mode in modes:
        for seed in [int(s) for s in args.seeds.split(",")]:
            t1 = time.time()
            if args.init_from:  # an engine-trained checkpoint (e.g. the demo's pre-training)
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(args.init_from)
                model.set_attn_implementation("cat_sdpa")
            else:
                model = build_model(args, tok, seed)
                if pre_state is not None:
                    model.load_state_dict(pre_state)
            st = train(model, train_ex, collate, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
                       args=args, cat=(mode == "cat"), tag=f"{mode}/{seed}")
            train_s = time.time() - t1
            if args.save_dir:
                model.save_pretrained(Path(args.save_dir) / f"{mode}_s{seed}")
                tok.save_pretrained(Path(args.save_dir) / f"{mode}_s{seed}")
            t2 = time.time()
            iid = evaluate(model, tok, recs["test_iid"])
            ood = evaluate(model, tok, recs["test_ood"])
            row = {"mode": mode, "seed": seed, "iid": iid["acc"], "ood": ood["acc"],
                   "ood_conflict": ood["conflict_acc"], "ood_conflict_n": ood["conflict_n"],
                   "ratio_ood": round(attention_ratio(model, ood_ex, collate), 3)}
            if args.eval_train:
                row["train_acc"] = evaluate(model, tok, recs["train"])["acc"]
            row.update({"lm_loss": round(st["lm_loss"], 4), "diverged_step": st["diverged_step"],
                        "train_s": round(train_s, 1),
                        "eval_s": round(time.time() - t2, 1), "pretrain_s": round(pre_s, 1), "config": cfg_echo})
            results.setdefault(mode, []).append(row)
            print(json.dumps(row), flush=True)
    summary = {"summary": True, "prep_s": round(prep_s, 1), "total_s": round(time.time() - t0, 1)}
    for mode, rows in results.items():
        for k in ("iid", "ood", "ood_conflict", "ratio_ood", "train_s"):
            summary[f"{mode}_{k}"] = round(sum(r[k] for r in rows) / len(rows), 4)
    if "base" in results and "cat" in results:
        summary["delta_ood"] = round(summary["cat_ood"] - summary["base_ood"], 4)
        summary["delta_iid"] = round(summary["cat_iid"] - summary["base_iid"], 4)
    summary["config"] = cfg_echo
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
