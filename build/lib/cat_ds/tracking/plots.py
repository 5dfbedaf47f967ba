"""Run plots (PNG, matplotlib Agg: no display needed) drawn from the logged metric history
`{name: [(step, value), ...]}`. Which metric goes in which plot is decided by name:

- loss.png: every metric with "loss" in its name and not starting with "eval/";
- attention_ratio.png: metrics with "attn_ratio" in the name and no per-layer suffix
  (the mean causal/non-causal attention ratio of the supervised rows, per step);
- attention_ratio_layers.png: `<prefix>/layer_<i>` metrics with "attn_ratio" in the prefix
  (the probe set's per-layer ratio), first vs last evaluation: shows CAT moving attention;
- eval_accuracy.png: the last value of every `eval/<set>/accuracy` as bars (IID, OOD, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless nodes have no display

import matplotlib.pyplot as plt  # noqa: E402

History = dict[str, list[tuple[int, float]]]
_LAYER = re.compile(r"^(?P<prefix>.*attn_ratio.*)/layer_(?P<layer>\d+)$")
_EVAL_ACC = re.compile(r"^eval/(?P<set>[^/]+)/accuracy$")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curves(history: History, names: list[str], title: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        pts = sorted(history[name])
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=name)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_bars(values: dict[str, float], path: Path, title: str = "evaluation accuracy") -> Path:
    fig, ax = plt.subplots(figsize=(max(3, 1.2 * len(values) + 1), 4))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="tab:blue")
    for b, n in zip(bars, names):
        ax.annotate(f"{values[n]:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set(title=title, ylabel="accuracy", ylim=(0, 1.05))
    return _save(fig, path)


def run_plots(history: History, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    written: list[Path] = []
    loss = sorted(k for k in history if "loss" in k and not k.startswith("eval/"))
    if loss:
        written.append(_curves(history, loss, "training loss", "loss", out / "loss.png"))
    ratio = sorted(k for k in history if "attn_ratio" in k and not _LAYER.match(k))
    if ratio:
        written.append(_curves(history, ratio, "causal / non-causal attention ratio", "ratio", out / "attention_ratio.png"))
    layers: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for k, pts in history.items():
        m = _LAYER.match(k)
        if m:
            layers.setdefault(m["prefix"], {})[int(m["layer"])] = sorted(pts)
    if layers:
        fig, ax = plt.subplots(figsize=(7, 4))
        for prefix, per_layer in sorted(layers.items()):
            idx = sorted(per_layer)
            first = [per_layer[i][0] for i in idx]
            last = [per_layer[i][-1] for i in idx]
            ax.plot(idx, [v for _, v in first], "o--", label=f"{prefix} step {first[0][0]}")
            ax.plot(idx, [v for _, v in last], "o-", label=f"{prefix} step {last[0][0]}")
        ax.set(title="per-layer attention ratio on the probe set", xlabel="layer", ylabel="ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "attention_ratio_layers.png"))
    acc = {m["set"]: sorted(history[k])[-1][1] for k in history if (m := _EVAL_ACC.match(k))}
    if acc:
        written.append(accuracy_bars(dict(sorted(acc.items())), out / "eval_accuracy.png"))
    return written
