"""Scorer edge cases: whitespace, newline cut, EOS text, "####" variants, letters, numbers."""

import pytest

from cat_ds.evaluation.generate import postprocess
from cat_ds.evaluation.scorers import exact, get_scorer, gsm8k, numeric


@pytest.mark.parametrize(
    "pred,target,ok",
    [
        ("High Risk", "High Risk", True),
        ("  High Risk \n", "High Risk", True),  # whitespace around is not an error
        ("High  Risk", "High Risk", False),  # inner whitespace is
        ("high risk", "High Risk", False),  # case-sensitive, like the research code
        ("High Risk.", "High Risk", False),
        ("B", "B", True),  # ARC-E letters
        ("B) Paris", "B", False),
        ("84", "84", True),
        ("84.0", "84", False),  # exact is exact: see `numeric`
        ("", "0", False),
        ("57", 57, True),  # numeric targets compare as str(target)
    ],
)
def test_exact(pred, target, ok):
    assert exact(pred, target) is ok


@pytest.mark.parametrize(
    "pred,target,ok",
    [
        ("He has 3 + 4 = 7 apples.\n#### 7", "3 + 4 = 7\n#### 7", True),
        ("#### 7", "7", True),  # target without a "####" line: the whole target
        ("####7", "7", True),  # no space after the marker
        ("#### 5\n... wait\n#### 7", "#### 7", True),  # the LAST marker counts
        ("#### 7\n#### 5", "#### 7", False),
        ("#### 7\n\nQuestion: next one", "#### 7", True),  # model keeps talking: first line
        ("The answer is 7", "#### 7", False),  # no marker: no answer
        ("#### 1,000", "#### 1000", True),  # thousands separators
        ("#### 7.0", "#### 7", False),  # reference gsm8k compares text
        ("####  -3 ", "#### -3", True),
    ],
)
def test_gsm8k(pred, target, ok):
    assert gsm8k(pred, target) is ok


@pytest.mark.parametrize(
    "pred,target,ok",
    [
        ("84", "84.0", True),
        ("84.0", 84, True),
        ("1,000", "1000", True),
        ("-3", "-3.00", True),
        ("84.5", "84", False),
        ("1e2", "100", True),
        ("High Risk", "High Risk", True),  # non-numbers fall back to exact
        ("High Risk", "Low Risk", False),
        ("84 apples", "84", False),
        ("nan", "nan", True),  # not a finite number: compared as text
    ],
)
def test_numeric(pred, target, ok):
    assert numeric(pred, target) is ok


def test_get_scorer_names_the_choices():
    assert get_scorer("gsm8k") is gsm8k
    with pytest.raises(ValueError, match="exact.*gsm8k.*numeric"):
        get_scorer("f1")


@pytest.mark.parametrize(
    "raw,cut,expected",
    [
        (" High Risk", True, "High Risk"),
        (" High Risk\nAnswer: Low", True, "High Risk"),
        (" High Risk\nAnswer: Low", False, "High Risk\nAnswer: Low"),
        ("\n\n High Risk\nmore", True, "High Risk"),  # leading blank lines are not the answer
        ("", True, ""),
    ],
)
def test_postprocess_newline_cut(raw, cut, expected):
    assert postprocess(raw, cut) == expected
