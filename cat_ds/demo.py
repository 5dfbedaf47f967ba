"""`cat-ds demo`: the embedded default a new user runs first (README, first command).

Steps: generate STG data, train a small tokenizer locally, show what the causal mask
builder makes of the data. Training base vs CAT and comparing them joins this once the
engine lands (issue 9)."""

from __future__ import annotations

from pathlib import Path

import click


def prepare_data(out: Path, task: str, size: str, seed: int = 0, vocab_size: int = 512) -> tuple[Path, Path]:
    """Generated data dir and tokenizer dir under `out` (reused when already there)."""
    from cat_ds.data.stg import write_stg
    from cat_ds.data.tokenizers import train_tokenizer

    data_dir = out / "data" / f"{task}_{size}"
    tok_dir = out / "tokenizer"
    if not (data_dir / "meta.json").exists():
        click.echo(f"[demo] generating {task.upper()} size {size} -> {data_dir}")
        write_stg(data_dir, task=task, train_size=size, seed=seed)
    if not (tok_dir / "tokenizer.json").exists():
        click.echo(f"[demo] training a byte-level BPE tokenizer (vocab {vocab_size}) -> {tok_dir}")
        train_tokenizer([data_dir / "train.jsonl", data_dir / "test_ood.jsonl"], "bpe", vocab_size, tok_dir)
    return data_dir, tok_dir


def show_masks(data_dir: Path, tok_dir: Path) -> dict:
    from cat_ds.data.inspect import render_example, render_summary, summarize
    from cat_ds.data.records import load_records
    from cat_ds.data.spans import tokenize_example
    from cat_ds.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tok_dir)
    records = load_records(data_dir / "train.jsonl")
    examples = [tokenize_example(r, tok) for r in records]
    click.echo(f"[demo] cat-ds data inspect {data_dir / 'train.jsonl'} --tokenizer {tok_dir}")
    click.echo(render_example(0, records[0], examples[0], tok) + "\n")
    summary = summarize(examples)
    click.echo(render_summary(summary))
    return summary
