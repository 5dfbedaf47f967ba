"""`cat-ds demo`: the embedded default a new user runs first (README, first command).

Generates STG, trains a tokenizer locally, shows the causal masks, then trains base and CAT
with the same seeds through the real engine (`cat-ds train`: DeepSpeed ZeRO-3, 2 ranks on a
2-core CPU), evaluates IID and OOD, logs everything to the local MLflow store, and ends with
the `cat-ds compare` table and chart. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]  # configs live in the repo checkout, not the wheel
DEMO_CONFIG = REPO / "configs" / "demo_stg.yaml"
PRETRAIN_CONFIG = REPO / "configs" / "demo_pretrain.yaml"
MODEL_CONFIG = REPO / "configs" / "models" / "demo_llama.json"  # 0.85M parameters; demo_llama_wide.json: 4.3M
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
PRETRAIN_RECORDS = 38_400  # 600 steps x 64
TOKENIZER_NUMBERS_LINES = 5_000
# The recipe's optimizer (docs/demo_recipe.md): AdamW betas (0.9, 0.98), cosine decay to 10 % of lr.
DS_CONFIG = REPO / "ds_configs" / "zero3_cosine.json"
EXPERIMENT = "cat-ds-demo"


def prepare_data(out: Path, task: str, size: str, seed: int = 0, vocab_size: int = 512) -> tuple[Path, Path]:
    """Generated data dir and tokenizer dir under `out` (reused when already there)."""
    from cat_ds.data.numbers import write_numbers
    from cat_ds.data.stg import write_stg

    data_dir = out / "data" / f"{task}_{size}"
    tok_dir = out / "data" / f"{task}_{size}" / "tokenizer"
    numbers = out / "data" / "numbers.jsonl"
    if not (data_dir / "meta.json").exists():
        click.echo(f"[demo] generating {task.upper()} size {size} -> {data_dir}")
        write_stg(data_dir, task=task, train_size=size, seed=seed)
    if not numbers.exists():
        click.echo(f"[demo] generating {PRETRAIN_RECORDS} generic numbers questions for pre-training -> {numbers}")
        write_numbers(numbers, PRETRAIN_RECORDS, seed=seed)
    extra = tok_dir.parent / "tokenizer_numbers.txt"
    if (tok_dir / "tokenizer.json").exists() and not extra.exists():
        raise click.ClickException(
            f"{out} holds a tokenizer from an earlier cat-ds demo (trained on all the pre-training text; it splits "
            f"the STG labels) and models trained with it: remove {out} or pass a fresh --out")
    if not (tok_dir / "tokenizer.json").exists():
        click.echo(f"[demo] training a byte-level BPE tokenizer (vocab {vocab_size}) -> {tok_dir}")
        train_stg_tokenizer(data_dir, tok_dir, extra, vocab_size, seed)
    return data_dir, tok_dir


def train_stg_tokenizer(data_dir: Path, tok_dir: Path, numbers_text: Path, vocab_size: int = 512, seed: int = 0):
    """The demo's (and the recipe search's) tokenizer: STG train + OOD text plus a *small*
    numbers sample written to `numbers_text`. Why small: fed all 38,400 pre-training lines, a
    512-token BPE spends its merges on them and splits the label " Low" into " L" "o" "w", and
    CAT gained nothing from it (docs/demo_recipe.md)."""
    from cat_ds.data.numbers import GENERIC_NAMES, numbers_corpus
    from cat_ds.data.stg import STG_NAMES
    from cat_ds.data.tokenizers import train_tokenizer

    lines = numbers_corpus(TOKENIZER_NUMBERS_LINES, seed, GENERIC_NAMES + STG_NAMES)
    numbers_text.write_text("\n".join(r.text for r in lines) + "\n", encoding="utf-8")
    return train_tokenizer([data_dir / "train.jsonl", data_dir / "test_ood.jsonl", numbers_text], "bpe",
                           vocab_size, tok_dir)


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


def pretrain(out: Path, tok_dir: Path, nproc: int, quick: bool, model_config: Path) -> Path:
    """The generic numbers pre-training stage (once; reused by every run and later demos)."""
    run_dir = out / "runs" / ("pretrain_quick" if quick else "pretrain")
    export = run_dir / "export"
    if (export / "config.json").exists():
        have, want = (json.loads(f.read_text()) for f in (export / "config.json", model_config))
        diff = [k for k in SHAPE_KEYS if have.get(k) != want.get(k)]
        if diff:  # its fine-tuning runs would resume from checkpoints of another shape
            raise click.ClickException(
                f"{out} holds a demo pre-trained with another model shape ({', '.join(f'{k} {have.get(k)}' for k in diff)}; "
                f"{model_config} has {', '.join(f'{k} {want.get(k)}' for k in diff)}): pass a fresh --out")
        click.echo(f"[demo] reusing the pre-trained model {export}")
        return export
    progress = RunProgress(f"[demo] pre-training the model ({model_config.name}) on generic numbers text "
                           f"({'quick' if quick else '600 steps'})")
    sets = [f"output_dir={run_dir}", f"model.config={model_config}",
            f"model.tokenizer={tok_dir}", f"data.train={out / 'data' / 'numbers.jsonl'}"]
    if quick:
        sets += ["train.max_steps=8", "train.log_every=4"]
    run_training(PRETRAIN_CONFIG, sets, nproc, out / "runs" / f"{run_dir.name}.log", progress)
    progress.done()
    return export


def train_overrides(data_dir: Path, pretrained: Path, run_dir: Path, mode: str, seed: int, quick: bool) -> list[str]:
    sets = [
        f"output_dir={run_dir}",
        f"model.name_or_path={pretrained}",
        f"data.train={data_dir / 'train.jsonl'}",
        f"data.eval.iid={data_dir / 'test_iid.jsonl'}",
        f"data.eval.ood={data_dir / 'test_ood.jsonl'}",
        f"train.seed={seed}",
        f"cat.enabled={'true' if mode == 'cat' else 'false'}",
        "tracking.mlflow=true",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.run_name={run_dir.name}",
    ]
    if quick:  # a smoke run of the whole path: a few steps, a small eval
        sets += ["train.max_steps=12", "eval.limit=40", "eval.probe_size=4", "train.save_every=0",
                 "train.warmup_steps=2", "train.log_every=4"]
    return sets


class RunProgress:
    """The console's view of one training run: its label, then the trainer's step lines as they come
    (rewritten in place on a terminal, one line each otherwise), then `done in Ns`."""

    STEP = re.compile(r"\[cat-ds\] step (\d+)/(\d+) .*?\bloss ([0-9.]+)")

    def __init__(self, label: str):
        self.label, self.t0, self.tty = label, time.time(), sys.stdout.isatty()
        click.echo(f"{label} ...", nl=not self.tty)

    def feed(self, line: str) -> None:
        m = self.STEP.search(line)
        if m is None:
            return
        step, total, loss = int(m[1]), int(m[2]), float(m[3])
        text = f"step {step}/{total} ({100 * step // total}%) loss {loss:.4f}, {time.time() - self.t0:.0f}s"
        if self.tty:  # one line per run, rewritten in place
            click.echo(f"\r\033[K{self.label} ... {text}", nl=False)
        else:
            click.echo(f"    {text}")

    def done(self, extra: str = "") -> None:
        prefix = f"\r\033[K{self.label} ..." if self.tty else f"{self.label}:"
        click.echo(f"{prefix} done in {time.time() - self.t0:.0f}s{extra}")


def run_training(config: Path, overrides: list[str], nproc: int, log: Path, progress: RunProgress) -> None:
    """One `cat-ds train` run: its whole output goes to `log`, its step lines also to `progress`."""
    cmd = [sys.executable, "-m", "cat_ds.cli", "train", str(config), "--nproc", str(nproc), "--ds-config", str(DS_CONFIG),
           "--resume", "auto"] + [a for kv in overrides for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as fh, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        # newline="": split at tqdm's "\r" too (progress stays live) but keep it, so the log is the raw output
        for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            fh.write(line)
            fh.flush()  # the log is the place to look while a run is going
            progress.feed(line)
        rc = proc.wait()
    if rc != 0:
        if progress.tty:
            click.echo("")
        raise click.ClickException(f"training failed (exit {rc}); last lines of {log}:\n{log_tail(log)}")


def log_tail(log: Path, n: int = 25) -> str:
    """The last `n` lines of a run log as a terminal shows them: of "\r"-separated progress frames, the last."""
    lines = log.read_bytes().decode("utf-8", "replace").rstrip("\n").split("\n")
    return "\n".join(next((seg for seg in reversed(ln.split("\r")) if seg.strip()), "") for ln in lines[-n:])


def run_demo(task: str, size: str, seeds: int, out: Path, quick: bool, nproc: int | None,
             model_config: Path | None = None) -> str:
    from cat_ds.tracking.compare import compare
    from cat_ds.tracking.mlflow_logger import resolve_tracking_uri

    out = out.resolve()
    data_dir, tok_dir = prepare_data(out, task, size)
    show_masks(data_dir, tok_dir)
    nproc = nproc or min(2, os.cpu_count() or 1)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    pretrained = pretrain(out, tok_dir, nproc, quick, (model_config or MODEL_CONFIG).resolve())
    jobs = [(seed, mode) for seed in range(seeds) for mode in ("base", "cat")]
    click.echo(f"\n[demo] training {len(jobs)} runs (base and CAT x {seeds} seed(s)) on {nproc} rank(s), "
               f"DeepSpeed ZeRO-3; logs in {runs_dir}/<run>.log")
    t_all = time.time()
    for i, (seed, mode) in enumerate(jobs, 1):
        run_dir = runs_dir / f"{task}_{size}_{mode}_s{seed}"
        progress = RunProgress(f"[demo] ({i}/{len(jobs)}) {mode:>4} seed {seed}")
        run_training(DEMO_CONFIG, train_overrides(data_dir, pretrained, run_dir, mode, seed, quick), nproc,
                     runs_dir / f"{run_dir.name}.log", progress)
        progress.done(_accuracies(run_dir))
    click.echo(f"[demo] all runs done in {(time.time() - t_all) / 60:.1f} min\n")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(runs_dir / "mlflow")
    table = compare(uri, experiments=[EXPERIMENT], out_dir=out / "compare")
    click.echo(table)
    click.echo(f"\n[demo] table: {out / 'compare' / 'compare.md'}   chart: {out / 'compare' / 'compare.png'}")
    click.echo(f"[demo] MLflow store: {uri}  (mlflow ui --backend-store-uri {uri})")
    return table


def _accuracies(run_dir: Path) -> str:
    """`  IID 0.91  OOD 0.62` from the run's last eval line in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return ""
    last = {}
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if "eval/iid/accuracy" in m or "eval/ood/accuracy" in m:
            last.update(m)
    parts = [f"{k.split('/')[1].upper()} {last[k]:.3f}" for k in ("eval/iid/accuracy", "eval/ood/accuracy") if k in last]
    return ("  " + "  ".join(parts)) if parts else ""
