"""Scorers: (prediction, target) -> correct. The prediction is the generated continuation,
already decoded without special tokens and stripped (see `generate.py`).

- `exact`   (reference; STG, STG_H, ARC-E, MAWPS, SVAMP, ASDiv): the whole continuation equals
            str(target), both stripped.
- `gsm8k`   (reference): the text after the *last* "#### " in the continuation, stripped,
            equals the target's final answer (the text after its last "#### ", or the whole
            target if it has none). Thousands separators "1,000" are removed on both sides,
            as the usual GSM8K evaluation does.
- `numeric` (NOT the reference metric; documented option): like `exact`, but when both sides
            parse as numbers they are compared as numbers, so "84" equals "84.0" and "1,000"
            equals "1000". Use it to see how much of a gap is formatting; report `exact`.
"""

from __future__ import annotations

import math
import re
from typing import Callable

Scorer = Callable[[str, str], bool]

_GSM_MARK = "####"


def _final_answer(text: str) -> str | None:
    """Text after the last "####" (with or without a following space), stripped; None if absent."""
    idx = text.rfind(_GSM_MARK)
    if idx < 0:
        return None
    return text[idx + len(_GSM_MARK):].strip()


def exact(prediction: str, target: str) -> bool:
    return prediction.strip() == str(target).strip()


def gsm8k(prediction: str, target: str) -> bool:
    pred = _final_answer(prediction)
    if pred is None:
        return False  # the model never wrote "####": no answer, not correct
    gold = _final_answer(str(target))
    gold = str(target).strip() if gold is None else gold
    # "#### 72\n\nQuestion: ..." (a model that keeps talking): the answer is the first line.
    pred = pred.split("\n", 1)[0].strip()
    return pred.replace(",", "") == gold.replace(",", "")


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _as_number(text: str) -> float | None:
    t = text.strip().replace(",", "")
    if not _NUMBER.match(t):
        return None
    v = float(t)
    return v if math.isfinite(v) else None


def numeric(prediction: str, target: str) -> bool:
    a, b = _as_number(prediction), _as_number(str(target))
    if a is None or b is None:
        return exact(prediction, target)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


SCORERS: dict[str, Scorer] = {"exact": exact, "gsm8k": gsm8k, "numeric": numeric}


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}") from None
