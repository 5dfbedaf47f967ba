"""From phrases to a sparse token-level causal mask.

The research code re-tokenises " " + phrase and searches token ids, with per-tokenizer
hacks. We find phrases in the TEXT (character offsets) and map characters to tokens with
the fast tokenizer's offset mapping, which works for byte-level BPE and SentencePiece alike.

Matching rule (tests and the annotator depend on it):
- an occurrence is an exact, case-sensitive, non-overlapping left-to-right match, rejected
  when it would cut through a word: a phrase starting with a letter/digit must not follow a
  letter/digit, one ending with a letter/digit must not precede one ("5" is not in "15");
- a token belongs to an occurrence if its span [ts, te) is non-empty and overlaps it;
  special tokens (empty offsets) never belong;
- for key occurrence [ks, ke) and value occurrence [vs, ve) in token indices with
  ks - ve >= min_gap (default 1: the research code's `ks > ve`), rows ks-1 .. ke-2 get
  columns vs .. ve-1 (row t predicts token t+1, so the rows producing the key look at the
  value).
The mask is stored as rows (query position, sorted causal key positions); never T x T.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any

from cat_ds.data.records import CatRecord

# Reasons a phrase contributes nothing (counted, never raised).
NOT_FOUND = "not_found"  # absent from the text
TRUNCATED = "truncated"  # every occurrence lies (partly) beyond max_length
ORDER = "key_not_after_value"  # both present, but no key occurrence comes after a value one


def _is_word_char(c: str) -> bool:
    return c.isalnum()


def find_occurrences(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `phrase` in `text` under the matching rule."""
    if not phrase:
        return []
    check_start = _is_word_char(phrase[0])
    check_end = _is_word_char(phrase[-1])
    out: list[tuple[int, int]] = []
    pos = 0
    pattern = re.compile(re.escape(phrase))
    while True:
        m = pattern.search(text, pos)
        if m is None:
            return out
        s, e = m.span()
        if (check_start and s > 0 and _is_word_char(text[s - 1])) or (
            check_end and e < len(text) and _is_word_char(text[e])
        ):
            pos = s + 1  # rejected: a later overlapping match may still be valid
            continue
        out.append((s, e))
        pos = e


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    answer_start: int  # first answer token (its span reaches past len(input)); == len if none
    rows: list[tuple[int, list[int]]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    truncated: bool = False  # max_length cut the text

    def to_dict(self) -> dict[str, Any]:
        """Flat, Arrow-friendly form for `datasets.map` (rows as two parallel lists)."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "answer_start": self.answer_start,
            "cat_q": [q for q, _ in self.rows],
            "cat_cols": [cols for _, cols in self.rows],
            "n_skipped": len(self.skipped),
        }


class _TokenMap:
    """Character span -> token index range, via the offset mapping (binary search)."""

    def __init__(self, offsets: list[tuple[int, int]]):
        # Real tokens only (te > ts); special tokens carry empty spans and never belong.
        self.idx = [i for i, (s, e) in enumerate(offsets) if e > s]
        self.starts = [offsets[i][0] for i in self.idx]
        self.ends = [offsets[i][1] for i in self.idx]

    def tokens(self, cs: int, ce: int) -> tuple[int, int] | None:
        """[first, last+1) token indices overlapping [cs, ce), or None if no token does."""
        # Overlap: ts < ce and te > cs. Ends are non-decreasing for left-to-right tokenizers.
        lo = bisect.bisect_right(self.ends, cs)  # first token with te > cs
        hi = bisect.bisect_left(self.starts, ce)  # tokens before hi have ts < ce
        if lo >= hi:
            return None
        return self.idx[lo], self.idx[hi - 1] + 1


def tokenize_example(
    record: CatRecord,
    tokenizer,
    max_length: int | None = None,
    min_gap: int = 1,
) -> TokenizedExample:
    """Tokenise `input + target` once (EOS appended), label the answer, build the mask."""
    text = record.text
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    n_text = len(ids)
    eos = tokenizer.eos_token_id
    if eos is not None:
        if ids and ids[-1] == eos:
            n_text -= 1  # this tokenizer's post-processor already appends EOS
        else:
            ids.append(eos)
            offsets.append((0, 0))
    n_full = len(ids)
    if max_length is not None and n_full > max_length:
        ids, offsets = ids[:max_length], offsets[:max_length]

    # Answer tokens: those whose character span reaches past the input, then the appended
    # EOS (so an empty target still learns to stop). Nothing if truncation cut it all.
    n_in = len(record.input)
    answer_start = next(
        (i for i, (s, e) in enumerate(offsets) if (e > s and e > n_in) or i >= n_text), len(ids)
    )
    labels = [-100] * answer_start + ids[answer_start:]

    rows, skipped = build_mask_rows(record, offsets, n_full_tokens=n_full, min_gap=min_gap)
    return TokenizedExample(ids, labels, answer_start, rows, skipped, truncated=len(ids) < n_full)


def build_mask_rows(
    record: CatRecord,
    offsets: list[tuple[int, int]],
    n_full_tokens: int,
    min_gap: int = 1,
) -> tuple[list[tuple[int, list[int]]], list[dict[str, str]]]:
    """Sparse mask rows [(q, sorted cols)] and skipped phrases for one record.

    `offsets` may be truncated; a phrase whose tokens all lie past the end is `truncated`."""
    if not record.important:
        return [], []
    text = record.text
    tmap = _TokenMap(offsets)
    n_tokens = len(offsets)
    truncated = n_tokens < n_full_tokens
    # The last character covered by the kept tokens: an occurrence must end before it.
    kept_chars = tmap.ends[-1] if tmap.ends else 0

    span_cache: dict[str, tuple[list[tuple[int, int]], str | None]] = {}

    def token_spans(phrase: str) -> tuple[list[tuple[int, int]], str | None]:
        if phrase not in span_cache:
            occ = find_occurrences(text, phrase)
            if not occ:
                span_cache[phrase] = ([], NOT_FOUND)
            else:
                spans = []
                for cs, ce in occ:
                    if truncated and ce > kept_chars:
                        continue
                    t = tmap.tokens(cs, ce)
                    if t is not None:
                        spans.append(t)
                span_cache[phrase] = (spans, None if spans else TRUNCATED)
        return span_cache[phrase]

    mask: dict[int, set[int]] = {}
    skipped: list[dict[str, str]] = []
    reported: set[str] = set()

    def skip(phrase: str, reason: str) -> None:
        if phrase not in reported:
            reported.add(phrase)
            skipped.append({"phrase": phrase, "reason": reason})

    for key, values in record.important:
        key_spans, key_reason = token_spans(key)
        if key_reason:
            skip(key, key_reason)
        for value in values:
            val_spans, val_reason = token_spans(value)
            if val_reason:
                skip(value, val_reason)
            if key_reason or val_reason:
                continue
            hit = False
            for ks, ke in key_spans:
                for vs, ve in val_spans:
                    if ks - ve < min_gap:
                        continue
                    hit = True
                    cols = range(vs, ve)
                    for q in range(ks - 1, ke - 1):
                        mask.setdefault(q, set()).update(cols)
            if not hit:
                skip(f"{key} <- {value}", ORDER)
    rows = [(q, sorted(cols)) for q, cols in sorted(mask.items())]
    return rows, skipped
