"""Tolerant parsing of an LLM's annotation answer, and validation against the record.

Accepted answers (anything else is "unparsable" and retried by the runner):
- JSON, or JSON inside a Markdown fence (```json ... ```), or JSON embedded in prose;
- either `important` shape (list of key objects, or one plain object), optionally wrapped
  as {"important": ...}; a number among the value phrases is taken as its text.

Validation uses the project's matching rule (`cat_ds.data.spans.find_occurrences`) on the
training text `input + target`: a (key, value) pair is kept when both phrases occur and some
key occurrence starts at or after the end of some value occurrence (character positions;
the token-level gap rule is applied later by the mask builder).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from cat_ds.data.records import Important, normalize_important
from cat_ds.data.spans import find_occurrences

KEY_NOT_FOUND = "key_not_found"
VALUE_NOT_FOUND = "value_not_found"
KEY_NOT_AFTER_VALUE = "key_not_after_value"
DROP_REASONS = (KEY_NOT_FOUND, VALUE_NOT_FOUND, KEY_NOT_AFTER_VALUE)

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\r?\n(.*?)```", re.DOTALL)


class ParseError(ValueError):
    """The answer holds no usable annotation (the runner retries, then rejects)."""


def _candidates(text: str) -> list[Any]:
    """Decoded JSON values worth trying, most specific first."""
    out: list[Any] = []
    for block in _FENCE.findall(text):
        try:
            out.append(json.loads(block))
        except json.JSONDecodeError:
            pass  # a broken fence may still be followed by good JSON; keep looking
    stripped = text.strip()
    try:
        out.append(json.loads(stripped))
    except json.JSONDecodeError:
        pass  # not pure JSON: look for JSON embedded in prose below
    # Top-level JSON values embedded in prose; never a value nested inside one already found
    # (`{"k": {"x": 1}}` must not yield `{"x": 1}`).
    dec = json.JSONDecoder()
    end = 0
    for m in re.finditer(r"[\[{]", text):
        if m.start() < end:
            continue
        try:
            value, end = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, (list, dict)) and value:
            out.append(value)
    return out


def _coerce(value: Any) -> Any:
    """Unwrap {"important": ...}; numbers among value phrases become their text."""
    if isinstance(value, dict) and set(value) == {"important"}:
        value = value["important"]

    def fix_vals(v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, list):
            return [fix_vals(x) if not isinstance(x, list) else x for x in v]
        return v

    if isinstance(value, dict):
        return {k: fix_vals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [{k: fix_vals(v) for k, v in o.items()} if isinstance(o, dict) else o for o in value]
    return value


def parse_answer(text: str | None) -> Important:
    """The model's reply -> ordered [(key, [values])]; raises ParseError when none fits."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    last_error = "no JSON list or object found"
    for cand in _candidates(text):
        try:
            parsed = normalize_important(_coerce(cand), "answer: ")
        except ValueError as e:
            last_error = str(e)
            continue
        if parsed is not None:
            return parsed
    raise ParseError(last_error)


def validate_pairs(text: str, important: Important) -> tuple[Important, Counter, list[dict]]:
    """Keep the (key, value) pairs that hold on `text`.

    Returns (kept pairs grouped by key in first-seen order, dropped counts by reason,
    dropped details [{"key", "value", "reason"}]). Duplicate keys are merged, duplicate
    values within a key kept once.
    """
    occ_cache: dict[str, list[tuple[int, int]]] = {}

    def occ(p: str) -> list[tuple[int, int]]:
        if p not in occ_cache:
            occ_cache[p] = find_occurrences(text, p)
        return occ_cache[p]

    kept: dict[str, list[str]] = {}
    dropped: Counter = Counter()
    details: list[dict] = []
    for key, values in important:
        for value in values:
            if value in kept.get(key, ()):
                continue
            k_occ, v_occ = occ(key), occ(value)
            if not k_occ:
                reason = KEY_NOT_FOUND
            elif not v_occ:
                reason = VALUE_NOT_FOUND
            elif max(ks for ks, _ in k_occ) < min(ve for _, ve in v_occ):
                reason = KEY_NOT_AFTER_VALUE
            else:
                kept.setdefault(key, []).append(value)
                continue
            dropped[reason] += 1
            details.append({"key": key, "value": value, "reason": reason})
    return list(kept.items()), dropped, details


def to_record_shape(important: Important) -> list[dict[str, list[str]]]:
    """The list-of-one-key-objects shape written to the output file."""
    return [{k: list(v)} for k, v in important]
