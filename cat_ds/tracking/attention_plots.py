"""Pictures of where the answer looks, from an `attention_map.AttentionTable`:

- record_<i>.png: the record's tokens shaded by the answer rows' attention, one block per model,
  causal tokens underlined in blue, the rows producing the answer framed in green;
- shares.png: the share of attention on causal vs non-causal tokens per model and, on STG, on each
  field (causal values, their twins, the irrelevant ones); layers.png with --per-layer;
- attention.html: the same, tokens as text, one self-contained file (inline CSS, the charts as
  data URIs); attention.json / attention.md: the numbers behind them.

One colour scale per record, shared by its models so their blocks compare. It is set by the
largest mass outside the first token and the answer rows (an attention sink and a row's own token
can take most of the mass and would wash everything else out); larger values get the darkest shade.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cat_ds.evaluation.attention_map import CAUSAL, NON_CAUSAL, STG_FIELDS, AttentionTable, RecordMap, field_role, \
    ordered_groups
from cat_ds.tracking.plots import _save, plt  # Agg already selected there

FONT = 9
CHAR_IN = 0.602 * FONT / 72  # DejaVu Sans Mono's advance width, inches per character
LINE_IN = 0.27
WIDTH = 100  # characters per line
CMAP = "YlOrRd"
CAUSAL_COLOR, ROW_COLOR = "#1f5fbf", "#1a8f3a"


def token_text(t: str) -> str:
    return t.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "") or "\u2205"


def scale(rm: RecordMap) -> float:
    skip = {0, *rm.rows}
    vals = [v for att in rm.attention.values() for k, v in enumerate(att) if k not in skip]
    return max(vals, default=0.0) or max((v for att in rm.attention.values() for v in att), default=1.0) or 1.0


def layout(tokens: list[str], width: int = WIDTH) -> list[list[tuple[int, int]]]:
    """Tokens wrapped into lines of at most `width` characters: per line, (column, x) pairs."""
    lines, cur, x = [], [], 0
    for k, t in enumerate(tokens):
        n = len(token_text(t))
        if cur and x + n > width:
            lines.append(cur)
            cur, x = [], 0
        cur.append((k, x))
        x += n
    return lines + [cur] if cur else lines


def _fmt_shares(rm: RecordMap, model: str) -> str:
    s = rm.shares(model)
    return f"causal {100 * s[CAUSAL]:.1f} %" if CAUSAL in s else "no causal annotation"


def record_png(rm: RecordMap, path: Path) -> Path:
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    lines = layout(rm.tokens)
    width = max(x + len(token_text(rm.tokens[k])) for line in lines for k, x in line)
    models = list(rm.attention)
    n_units = len(models) * (len(lines) + 1.4)
    w_in, h_in = max(width * CHAR_IN, 5.0), n_units * LINE_IN
    top, bottom, side = 0.55, 0.95, 0.25  # inches
    W, H = w_in + 2 * side, h_in + top + bottom
    fig = plt.figure(figsize=(W, H))
    ax = fig.add_axes([side / W, bottom / H, w_in / W, h_in / H])  # x in characters, y in lines
    ax.set_xlim(0, w_in / CHAR_IN)
    ax.set_ylim(n_units, 0)
    ax.axis("off")
    vmax = scale(rm)
    norm, cmap = Normalize(0, vmax, clip=True), plt.get_cmap(CMAP)
    causal, rows = set(rm.causal), set(rm.rows)
    y = 0.0
    for m in models:
        ax.text(0, y + 0.75, f"{m}: {_fmt_shares(rm, m)}", fontsize=FONT, fontweight="bold", va="baseline")
        y += 1.3
        att = rm.attention[m]
        for line in lines:
            for k, x in line:
                text, v = token_text(rm.tokens[k]), norm(att[k])
                ax.add_patch(Rectangle((x, y + 0.06), len(text), 0.8, facecolor=cmap(v), linewidth=0))
                if k in rows:
                    ax.add_patch(Rectangle((x, y + 0.06), len(text), 0.8, fill=False, edgecolor=ROW_COLOR,
                                           linewidth=1.4))
                if k in causal:
                    ax.plot([x, x + len(text)], [y + 0.93, y + 0.93], color=CAUSAL_COLOR, linewidth=2.2,
                            solid_capstyle="butt")
                ax.text(x, y + 0.68, text, fontsize=FONT, family="DejaVu Sans Mono", va="baseline",
                        color="white" if v > 0.65 else "black")
            y += 1.0
        y += 0.1
    fig.suptitle(f"record {rm.index} ({rm.source}), answer {rm.target!r}: attention of the rows producing it",
                 fontsize=FONT + 1, x=side / W, ha="left", y=1 - 0.12 / H)
    cax = fig.add_axes([side / W, 0.5 / H, min(0.4, 3.2 / W), 0.12 / H])
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cax.xaxis.set_major_locator(plt.MaxNLocator(4))
    cax.tick_params(labelsize=FONT - 1)
    fig.text(cax.get_position().x1 + 0.1 / W, 0.5 / H, f"mass per token (darkest: {vmax:.3f} or more)", fontsize=FONT - 1)
    fig.text(side / W, 0.08 / H, "averaged over layers, heads and the rows producing the answer (green frame); "
             "blue underline: causal tokens", fontsize=FONT - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(g: str) -> str:
    return f"{g}\n({field_role(g)})" if g in STG_FIELDS else g


def _bars(ax, summary, groups: list[str], title: str) -> None:
    models = list(summary)
    w = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs = [g + (i - (len(models) - 1) / 2) * w for g in range(len(groups))]
        ys = [100 * summary[m].get(g, (float("nan"), 0))[0] for g in groups]
        bars = ax.bar(xs, ys, w, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_label(g) for g in groups], fontsize=8)
    ax.set(title=title, ylabel="share of the answer rows' attention (%)")
    ax.margins(y=0.12)
    ax.legend(fontsize=8)


def shares_png(table: AttentionTable, path: Path) -> Path | None:
    summary = table.summary()
    seen = {g for s in summary.values() for g in s}
    head = [g for g in (CAUSAL, NON_CAUSAL) if g in seen]
    fields = [g for g in STG_FIELDS if g in seen]
    if not head and not fields:
        return None  # no annotated record: nothing to split into groups
    panels = [p for p in ((head, "causal tokens vs the rest"), (fields, "each STG field")) if p[0]]
    ratios = [max(2, len(g)) for g, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 + 1.25 * sum(ratios), 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    n = max(v[1] for s in summary.values() for v in s.values())
    for ax, (groups, title) in zip(axes[0], panels):
        _bars(ax, summary, groups, f"{title} ({n} records)")
    return _save(fig, path)


def layers_png(table: AttentionTable, path: Path) -> Path | None:
    per = [table.summary(layer) for layer in range(table.num_layers())]
    if not per or not any(CAUSAL in s for layer in per for s in layer.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in table.models:
        ax.plot(range(len(per)), [100 * layer[m].get(CAUSAL, (float("nan"), 0))[0] for layer in per], "o-", label=m)
    ax.set(title="share of attention on causal tokens, per layer (heads averaged)", xlabel="layer",
           ylabel="causal share (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def to_markdown(table: AttentionTable) -> str:
    summary, models = table.summary(), list(table.models)
    groups = ordered_groups(g for s in summary.values() for g in s)
    diff = len(models) == 2
    head = ["group", *models] + ([f"{models[1]} − {models[0]}"] if diff else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [summary[m].get(g) for m in models]
        row = [_label(g).replace("\n", " "), *(f"{100 * c[0]:.2f} (n={c[1]})" if c else "-" for c in cells)]
        if diff:
            row.append(f"{100 * (cells[1][0] - cells[0][0]):+.2f}" if all(cells) else "-")
        out.append("| " + " | ".join(row) + " |")
    out.append("\nShare (%) of the attention of the rows that produce the answer, averaged over layers, heads, "
               "those rows and the records (n); causal + non-causal = 100.\n")
    if table.per_layer and table.num_layers():
        out += ["| layer | " + " | ".join(f"{m} causal" for m in models) + " |", "|" + "---|" * (len(models) + 1)]
        for layer in range(table.num_layers()):
            s = table.summary(layer)
            out.append(f"| {layer} | " + " | ".join(f"{100 * s[m][CAUSAL][0]:.2f}" if CAUSAL in s[m] else "-"
                                                   for m in models) + " |")
        out.append("")
    if table.problems:
        out += ["Not drawn:", *(f"- {p}" for p in table.problems), ""]
    return "\n".join(out)


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1100px}
.tok{font-family:"DejaVu Sans Mono",monospace;font-size:13px;line-height:1.9;white-space:pre-wrap}
.c{border-bottom:3px solid #1f5fbf}.a{outline:1.5px solid #1a8f3a}
.model{margin:.4em 0 .8em}.label{font-weight:bold;font-size:13px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"""


def _uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def record_html(rm: RecordMap) -> str:
    vmax, causal, rows = scale(rm), set(rm.causal), set(rm.rows)
    out = [f"<h3>record {rm.index} <small>({html.escape(rm.source)})</small>, answer {html.escape(repr(rm.target))}</h3>"]
    for m, att in rm.attention.items():
        spans = []
        for k, t in enumerate(rm.tokens):
            a = min(1.0, att[k] / vmax)
            cls = " ".join(c for c, on in (("c", k in causal), ("a", k in rows)) if on)
            spans.append(f'<span class="tok {cls}" style="background:rgba(220,50,20,{a:.3f})" '
                         f'title="{att[k]:.4f}">{html.escape(token_text(t))}</span>')
        out.append(f'<div class="model"><div class="label">{html.escape(m)}: {_fmt_shares(rm, m)}</div>'
                   + "".join(spans) + "</div>")
    return "\n".join(out)


def html_page(table: AttentionTable, charts: list[Path]) -> str:
    summary, models = table.summary(), list(table.models)
    groups = ordered_groups(g for s in summary.values() for g in s)
    rows = "".join(f"<tr><td>{html.escape(_label(g))}</td>"
                   + "".join(f"<td>{100 * summary[m][g][0]:.2f}</td>" if g in summary[m] else "<td>-</td>"
                             for m in models) + "</tr>" for g in groups)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>where the answer looks</title>"
             f"<style>{CSS}</style></head><body><h1>Where the answer looks</h1>",
             "<p>Models: " + ", ".join(f"<b>{html.escape(m)}</b> ({html.escape(src)})" for m, src in table.models.items())
             + ". Shade: attention of the rows that produce the answer (green frame) on each token, averaged over "
             "layers, heads and those rows (hover a token for its value); blue underline: causal tokens.</p>",
             f"<table><tr><th>share (%)</th>{''.join(f'<th>{html.escape(m)}</th>' for m in models)}</tr>{rows}</table>",
             *(f'<p><img alt="{p.stem}" src="{_uri(p)}"></p>' for p in charts)]
    parts += [record_html(rm) for rm in table.records]
    if table.problems:
        parts.append("<h3>Not drawn</h3><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in table.problems) + "</ul>")
    return "\n".join(parts) + "\n</body></html>\n"


def draw(table: AttentionTable, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Every picture and table into `out_dir` (names start with `prefix`); returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md, page = (out / f"{prefix}attention.{ext}" for ext in ("json", "md", "html"))
    js.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    md.write_text(to_markdown(table))
    charts = [p for p in (shares_png(table, out / f"{prefix}shares.png"),
                          layers_png(table, out / f"{prefix}layers.png") if table.per_layer else None) if p]
    records = [record_png(rm, out / f"{prefix}record_{rm.index}.png") for rm in table.records]
    page.write_text(html_page(table, charts), encoding="utf-8")
    return [js, md, *charts, *records, page]
