"""`cat-ds compare`: base vs CAT from MLflow runs, grouped by the `task` and `mode` tags,
mean ± std over seeds (sample std, n-1; "-" for a single run), CAT minus base. Works on any
tracking URI (the local SQLite store or a server): it only uses `MlflowClient.search_runs`.
Accuracy metrics are shown in percent points."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_METRICS = ("eval/iid/accuracy", "eval/ood/accuracy")
MODES = ("base", "cat")


@dataclass
class RunRow:
    run_id: str
    task: str
    mode: str
    seed: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None  # the run's exported model (param export.path, else OUTPUT_DIR/export)


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


def collect_runs(tracking_uri: str, experiments: list[str] | None = None, run_ids: list[str] | None = None,
                 include_unfinished: bool = False) -> list[RunRow]:
    """Runs named by id, else every (FINISHED, unless asked) run of the experiments."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if experiments:
            exps = []
            for name in experiments:
                e = client.get_experiment_by_name(name)
                if e is None:
                    raise ValueError(f"no experiment named {name!r} at {tracking_uri}")
                exps.append(e.experiment_id)
        else:
            exps = [e.experiment_id for e in client.search_experiments()]
        flt = "" if include_unfinished else "attributes.status = 'FINISHED'"
        runs, token = [], None
        while True:
            page = client.search_runs(exps, filter_string=flt, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    rows = []
    for r in runs:
        t, params = r.data.tags, r.data.params
        export = params.get("export.path") or (params.get("output_dir") and str(Path(params["output_dir"]) / "export"))
        rows.append(RunRow(r.info.run_id, t.get("task", "?"), t.get("mode", "?"), t.get("seed", "?"), dict(r.data.metrics),
                           export if export and Path(export).is_dir() else None))
    return rows


def summarize(rows: list[RunRow], metrics: list[str]) -> dict[tuple[str, str], dict[str, Cell]]:
    """{(task, metric): {mode: Cell}} over the runs that have the metric."""
    out: dict[tuple[str, str], dict[str, Cell]] = {}
    for task in sorted({r.task for r in rows}):
        for m in metrics:
            cells: dict[str, Cell] = {}
            for r in rows:
                if r.task == task and m in r.metrics:
                    cells.setdefault(r.mode, Cell([])).values.append(r.metrics[m])
            if cells:
                out[(task, m)] = cells
    return out


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("accuracy") else 1.0


def _fmt(cell: Cell | None, scale: float) -> str:
    if cell is None or not cell.n:
        return "-"
    std = "-" if math.isnan(cell.std) else f"{cell.std * scale:.2f}"
    return f"{cell.mean * scale:.2f} ± {std} (n={cell.n})"


def to_markdown(summary: dict[tuple[str, str], dict[str, Cell]]) -> str:
    modes_seen = sorted({m for cells in summary.values() for m in cells}, key=lambda m: (m not in MODES, MODES.index(m) if m in MODES else 0, m))
    head = ["task", "metric", *modes_seen, "CAT − base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, metric), cells in summary.items():
        s = _scale(metric)
        diff = "-"
        if "cat" in cells and "base" in cells:
            diff = f"{(cells['cat'].mean - cells['base'].mean) * s:+.2f}"
        lines.append("| " + " | ".join([task, metric, *(_fmt(cells.get(m), s) for m in modes_seen), diff]) + " |")
    note = "\nmean ± sample std over seeds (n runs); accuracy in percent points.\n"
    return "\n".join(lines) + "\n" + note


def chart(summary: dict[tuple[str, str], dict[str, Cell]], path: str | Path) -> Path:
    from cat_ds.tracking.plots import plt  # Agg already selected there

    groups = list(summary)
    modes = sorted({m for c in summary.values() for m in c}, key=lambda m: (m not in MODES, m))
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(groups) + 1), 4))
    for i, mode in enumerate(modes):
        xs, ys, es = [], [], []
        for g, key in enumerate(groups):
            cell = summary[key].get(mode)
            if cell:
                s = _scale(key[1])
                xs.append(g + (i - (len(modes) - 1) / 2) * width)
                ys.append(cell.mean * s)
                es.append(0.0 if math.isnan(cell.std) else cell.std * s)
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=mode)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{t}\n{m}" for t, m in groups], fontsize=8)
    ax.set(title="base vs CAT (mean ± std over seeds)", ylabel="value (accuracy in %)")
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(tracking_uri: str, *, experiments: list[str] | None = None, run_ids: list[str] | None = None,
            metrics: list[str] | None = None, out_dir: str | Path | None = None) -> str:
    """Markdown table (also written, with compare.png, to `out_dir` if given)."""
    metrics = list(metrics or DEFAULT_METRICS)
    rows = collect_runs(tracking_uri, experiments, run_ids)
    summary = summarize(rows, metrics)
    if not summary:
        raise ValueError(f"no runs with any of {metrics} at {tracking_uri}"
                         + (f" in experiment(s) {experiments}" if experiments else ""))
    md = to_markdown(summary)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        chart(summary, out / "compare.png")
    return md


def draw_attention(tracking_uri: str, data: list[str], out_dir: str | Path, *, experiments: list[str] | None = None,
                   run_ids: list[str] | None = None, records: int | None = 8, say=print) -> list[Path]:
    """`cat-ds attention` for each (task, seed)'s base and CAT runs on `data`, into
    OUT_DIR/<task>_s<seed>/; the files are logged as artifacts ("attention/") of both runs.
    A run without an exported model is one line (train.export=false: `cat-ds export` makes one)."""
    from mlflow import MlflowClient

    from cat_ds.evaluation.attention_map import measure_dirs
    from cat_ds.tracking.attention_plots import draw

    client = MlflowClient(tracking_uri=tracking_uri)
    pairs: dict[tuple[str, str], list[RunRow]] = {}
    for r in collect_runs(tracking_uri, experiments, run_ids):
        if r.model_dir is None:
            say(f"[attention] run {r.run_id} ({r.task} {r.mode} seed {r.seed}): no exported model; skipped")
        else:
            pairs.setdefault((r.task, r.seed), []).append(r)
    written: list[Path] = []
    for (task, seed), runs in sorted(pairs.items()):
        runs.sort(key=lambda r: (r.mode not in MODES, MODES.index(r.mode) if r.mode in MODES else 0, r.mode))
        labels = [r.mode if [x.mode for x in runs].count(r.mode) == 1 else f"{r.mode} {r.run_id[:8]}" for r in runs]
        table = measure_dirs([r.model_dir for r in runs], data, records=records, labels=labels, say=say)
        for line in table.problems:
            say(f"[attention] {line}")
        if not table.records:
            continue
        files = draw(table, Path(out_dir) / f"{task}_s{seed}")
        for r in runs:
            for f in files:
                client.log_artifact(r.run_id, str(f), "attention")
        written += files
    return written
