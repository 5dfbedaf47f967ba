"""`cat-ds data inspect`: what the mask builder makes of a file, per record and in sum.

JSON Lines schema (one object per record, then one summary line):
    {"index": i, "n_tokens": n, "answer_start": a,
     "rows": [[q, [k, ...]], ...],          # sorted by q, columns ascending
     "skipped": [{"phrase": p, "reason": r}, ...]}
    {"summary": {"records": .., "records_with_supervision": .., "supervised_rows": ..,
                 "mean_causal_cols_per_row": .., "skipped": {reason: count},
                 "truncated_records": .., "mean_tokens": .., "max_tokens": ..}}
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from cat_ds.data.records import CatRecord
from cat_ds.data.spans import TokenizedExample


def example_json(index: int, ex: TokenizedExample) -> dict:
    return {
        "index": index,
        "n_tokens": len(ex.input_ids),
        "answer_start": ex.answer_start,
        "rows": [[q, list(cols)] for q, cols in ex.rows],
        "skipped": list(ex.skipped),
    }


def summarize(examples: Iterable[TokenizedExample]) -> dict:
    examples = list(examples)
    rows = [cols for ex in examples for _, cols in ex.rows]
    lengths = [len(ex.input_ids) for ex in examples]
    reasons = Counter(s["reason"] for ex in examples for s in ex.skipped)
    return {
        "records": len(examples),
        "records_with_supervision": sum(1 for ex in examples if ex.rows),
        "supervised_rows": len(rows),
        "mean_causal_cols_per_row": round(sum(map(len, rows)) / len(rows), 3) if rows else 0.0,
        "skipped": dict(sorted(reasons.items())),
        "truncated_records": sum(1 for ex in examples if ex.truncated),
        "mean_tokens": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        "max_tokens": max(lengths, default=0),
    }


def render_example(index: int, record: CatRecord, ex: TokenizedExample, tokenizer) -> str:
    """Tokens with markers: {value} causal columns, <key> tokens produced by supervised
    rows, [answer] other answer tokens, plain prompt tokens."""
    keys = {q + 1 for q, _ in ex.rows}
    values = {c for _, cols in ex.rows for c in cols}
    pieces = []
    for i, tid in enumerate(ex.input_ids):
        t = tokenizer.convert_ids_to_tokens(tid)
        if i in keys:
            pieces.append(f"<{t}>")
        elif i in values:
            pieces.append(f"{{{t}}}")
        elif i >= ex.answer_start:
            pieces.append(f"[{t}]")
        else:
            pieces.append(t)
    cols = [len(c) for _, c in ex.rows]
    head = (
        f"record {index} ({record.source})  tokens {len(ex.input_ids)}  answer_start {ex.answer_start}"
        f"  supervised rows {len(ex.rows)}  causal cols/row {sum(cols) / len(cols) if cols else 0:.1f}"
    )
    lines = [head, "  " + " ".join(pieces)]
    for s in ex.skipped:
        lines.append(f"  skipped: {s['phrase']!r} ({s['reason']})")
    return "\n".join(lines)


def render_summary(summary: dict) -> str:
    lines = ["summary:"]
    for k, v in summary.items():
        lines.append(f"  {k}: {v}")
    lines.append("legend: {value} causal columns, <key> tokens whose rows are supervised, [answer] other answer tokens")
    return "\n".join(lines)
