"""`cat-ds data|tokenizer|annotate`: make, check, inspect and annotate CAT records."""

from __future__ import annotations

import click

from cat_ds.choices import LOSS_TYPES, TOKENIZER_KINDS


@click.group()
def data() -> None:
    """Generate, validate and inspect CAT records."""


@data.command("stg")
@click.option("--task", type=click.Choice(["stg", "stg_h"]), default="stg", help="STG (cancer risk) or STG_H (air quality).")
@click.option("--train-size", default=None, help="S|M|L (400/800/1600) or a number. Default: M for stg, 3000 for stg_h.")
@click.option("--test-size", type=int, default=None, help="IID and OOD test size. Default: 400 (stg), 1000 (stg_h).")
@click.option("--seed", type=int, default=0)
@click.option("--classes", type=click.Choice(["paper", "two", "three"]), default="paper",
              help="STG label bands: the research code's degenerate middle band (v == 2.7), none, or a real 2.7 <= v <= 7.2 band.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
def data_stg(task, train_size, test_size, seed, classes, out_dir):
    """Generate STG/STG_H: train.jsonl, test_iid.jsonl, test_ood.jsonl, meta.json."""
    from cat_ds.data.stg import write_stg

    try:
        meta = write_stg(out_dir, task=task, train_size=train_size, seed=seed, test_size=test_size, classes=classes)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    s = meta["sizes"]
    click.echo(f"wrote {task} to {out_dir}: train {s['train']}, test_iid {s['test_iid']}, test_ood {s['test_ood']} (seed {seed})")


@data.command("validate")
@click.argument("files", nargs=-1, required=True)
@click.option("--all-errors", is_flag=True, hidden=True)  # the default now; kept so old scripts still run
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="Map a record field to the source's column, e.g. --column input=question (as data.columns).")
def data_validate(files, all_errors, columns):
    """Check record sources (JSONL, JSON array, parquet, CSV, globs, save_to_disk directories,
    org/name:split on the hub): every error of every source (the first 20 shown, then a count),
    each with its file and line (or row) and field."""
    from cat_ds.data.records import RecordError, load_records

    mapping = dict(c.split("=", 1) for c in columns if "=" in c)
    try:
        records = load_records(files, collect_errors=True, columns=mapping)
    except (RecordError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    n_sup = sum(1 for r in records if r.important)
    click.echo(f"{len(records)} records OK ({n_sup} with causal supervision)")


@data.command("inspect")
@click.argument("files", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_name", default=None, help="Tokenizer name or directory (fast tokenizer). Default: the --model directory.")
@click.option("--max-length", type=int, default=None, help="Truncate token sequences to this length.")
@click.option("--min-gap", type=int, default=1, help="Minimum tokens between a value's end and its key's start (research code: 1).")
@click.option("--limit", type=int, default=3, help="Records shown in the human view (the summary covers all).")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per record, then a summary line.")
@click.option("--model", "model_name", default=None, help="Also score each record with this model: lm_loss, cat_loss, row_stats.")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16"]), default="float32")
@click.option("--alpha", type=float, default=2.0, help="Re-Attention threshold on a1/a0.")
@click.option("--loss-type", type=click.Choice(LOSS_TYPES), default="div")
@click.option("--heads", default="all", help="all | K (K sampled heads per layer, seeded).")
@click.option("--layers", default="all", help="all | last N | comma-separated layer indices.")
def data_inspect(files, tokenizer_name, max_length, min_gap, limit, as_json, model_name, dtype, alpha, loss_type, heads, layers):
    """Show the token-level causal mask built for each record (and, with --model, the
    model's LM loss, Re-Attention loss and per-row attention on the causal columns)."""
    import json as _json

    from tqdm import tqdm

    from cat_ds.data.inspect import example_json, render_example, render_summary, summarize
    from cat_ds.data.records import RecordError, load_records
    from cat_ds.data.spans import tokenize_example
    from cat_ds.data.tokenizers import load_tokenizer

    if tokenizer_name is None and model_name is None:
        raise click.UsageError("give --tokenizer (or --model, whose directory holds the tokenizer)")
    try:
        records = load_records(files)
    except (RecordError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    tok = load_tokenizer(tokenizer_name or model_name)
    scorer = _inspect_scorer(model_name, dtype, tok, alpha=alpha, loss_type=loss_type, heads=heads, layers=layers) if model_name else None
    examples, ratios = [], []
    show_bar = not as_json and (scorer is not None or len(records) >= 2000)
    for i, rec in enumerate(tqdm(records, desc="records", disable=not show_bar, leave=False)):
        ex = tokenize_example(rec, tok, max_length=max_length, min_gap=min_gap)
        examples.append(ex)
        obj = example_json(i, ex)
        if scorer is not None:
            obj.update(scorer(ex))
            if ex.rows and obj["row_stats"]:
                ratios.append(obj["ratio"])
        if as_json:
            click.echo(_json.dumps(obj))
        elif i < limit:
            text = render_example(i, rec, ex, tok)
            if scorer is not None:
                text += f"\n  lm_loss {obj['lm_loss']:.4f}  cat_loss {obj['cat_loss']:.4f}  causal/non-causal attention ratio {obj['ratio']:.3f}"
            click.echo(text + "\n")
    summary = summarize(examples)
    if scorer is not None:
        summary["mean_attention_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else None
    click.echo(_json.dumps({"summary": summary}) if as_json else render_summary(summary))


def _inspect_scorer(model_name, dtype, tok, **cat):
    """A function TokenizedExample -> {lm_loss, cat_loss, row_stats, ratio} for `inspect --model`."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from cat_ds.data.collate import CatCollator
    from cat_ds.reattention.diagnostics import score_example

    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=getattr(torch, dtype))
    model.eval()
    collate = CatCollator(tok.pad_token_id)

    def score(ex):
        res = score_example(model, collate([ex]), **cat)
        ratio = res["ratio"]
        return {"lm_loss": res["lm_loss"], "cat_loss": res["cat_loss"], "row_stats": res["row_stats"],
                "ratio": None if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) else ratio}

    return score


@click.group()
def tokenizer() -> None:
    """Train small local tokenizers (tests, demo)."""


@tokenizer.command("train")
@click.option("--data", "files", multiple=True, required=True, help="Training files (CAT JSONL/JSON or plain text); repeatable.")
@click.option("--kind", type=click.Choice(TOKENIZER_KINDS), default="bpe",
              help="Byte-level BPE (GPT-2/Llama-3/Qwen family) or SentencePiece-style metaspace BPE (Llama-2/TinyLlama).")
@click.option("--vocab-size", type=int, default=512)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def tokenizer_train(files, kind, vocab_size, out_dir):
    """Train a small tokenizer and save it as a Hugging Face tokenizer directory."""
    from cat_ds.data.tokenizers import train_tokenizer

    try:
        tok = train_tokenizer(files, kind, vocab_size, out_dir)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"trained {kind} tokenizer ({len(tok)} tokens) -> {out_dir}")


@click.command()
@click.argument("in_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Output JSONL (appended; a rerun resumes).")
@click.option("--model", required=True, help="Model name as the endpoint knows it.")
@click.option("--base-url", default=None, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (default: OpenAI, or $OPENAI_BASE_URL).")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, help="Requests in flight at most.")
@click.option("--prompt-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Template file with {examples}, {input}, {target} placeholders.")
@click.option("--examples", type=click.Path(exists=True, dir_okay=False), default=None, help="Few-shot CAT records (with important).")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, help="Retries per record on 429/5xx/timeouts/unparsable answers.")
@click.option("--timeout", type=float, default=120.0, help="Seconds per request.")
@click.option("--backoff", type=float, default=1.0, help="First retry delay in seconds (doubles, with jitter).")
@click.option("--temperature", default="0", help='Sampling temperature, or "none" to send none.')
@click.option("--max-tokens", type=int, default=None, help="Cap on answer tokens (not sent by default).")
@click.option("--rejects", type=click.Path(dir_okay=False), default=None, help="Failed records with reasons. Default: OUT.rejects.jsonl.")
@click.option("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key (never printed).")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None, help="Also write the summary as JSON here.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@click.option("--dry-run", is_flag=True, help="Print the prompt for the first record and exit without calling.")
def annotate(in_file, out_file, model, base_url, concurrency, prompt_template, examples, max_retries,
             timeout, backoff, temperature, max_tokens, rejects, api_key_env, summary_json, progress, dry_run):
    """Add causal `important` annotations to IN_FILE with an LLM (any OpenAI-compatible API)."""
    import json

    from cat_ds.annotate import AnnotateConfig, AnnotateError, annotate_file, format_summary
    from cat_ds.data.records import RecordError

    try:
        temp = None if temperature.lower() == "none" else float(temperature)
    except ValueError:
        raise click.BadParameter(f'{temperature!r}: expected a number or "none"', param_hint="--temperature") from None
    cfg = AnnotateConfig(model=model, base_url=base_url, concurrency=concurrency, max_retries=max_retries,
                         timeout=timeout, backoff=backoff, temperature=temp, max_tokens=max_tokens,
                         prompt_template=prompt_template, examples=examples, api_key_env=api_key_env,
                         rejects=rejects, progress=progress)
    try:
        summary = annotate_file(in_file, out_file, cfg, dry_run=dry_run, echo=click.echo)
    except (AnnotateError, RecordError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        return
    click.echo(format_summary(summary))
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
