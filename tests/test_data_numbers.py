"""cat_ds.data.numbers: every question's answer is right, whatever the kind mix and count."""
from __future__ import annotations

import re

import pytest

from cat_ds.data.numbers import GENERIC_NAMES, QUESTION_KINDS, numbers_corpus

_QA = re.compile(r"Question: (.+?) Answer: ([^.]+)")


def _right_answer(question: str, vals: dict[str, int]) -> str:
    if m := re.fullmatch(r"What is (.+) plus (.+)\?", question):
        return str(vals[m[1]] + vals[m[2]])
    if m := re.fullmatch(r"What is (.+)\?", question):
        return str(vals[m[1]])
    if m := re.fullmatch(r"Is (.+) greater than (.+)\?", question):
        return "Yes" if vals[m[1]] > vals[m[2]] else "No"
    if m := re.fullmatch(r"Is (.+) plus (.+) above (\d+)\?", question):
        return "Yes" if vals[m[1]] + vals[m[2]] > int(m[3]) else "No"
    m = re.fullmatch(r"Is (.+) above (\d+)\?", question)
    return "Yes" if vals[m[1]] > int(m[2]) else "No"


def _check(records, n_questions: int) -> list[str]:
    questions = []
    for r in records:
        items = r.input.split("Here is some data. ")[1].split(". Question:")[0]
        vals = {name: int(v) for name, v in (item.split(": ") for item in items.split(", "))}
        assert 4 <= len(vals) <= 8 and all(1 <= v <= 10 for v in vals.values())
        pairs = _QA.findall(r.input + r.target)
        assert len(pairs) == n_questions, r.text
        assert r.input.endswith("Answer: ") and r.important is None
        for q, a in pairs:
            assert a == _right_answer(q, vals), (q, a, vals)
            questions.append(q)
    return questions


@pytest.mark.parametrize("n_questions", [1, 3])
def test_answers_are_right(n_questions):
    questions = _check(numbers_corpus(300, 0, questions=n_questions), n_questions)
    assert len({q.split(" ")[0] + str("plus" in q) for q in questions}) == 4  # What / Is, with and without plus


def test_kind_weights_pick_the_kinds():
    lookups = _check(numbers_corpus(100, 1, GENERIC_NAMES, kind_weights=(1, 0, 0, 0, 0), questions=2), 2)
    assert all(re.fullmatch(r"What is [^+]+\?", q) and "plus" not in q for q in lookups)
    assert len(QUESTION_KINDS) == 5


def test_one_question_is_the_original_format():
    """questions=1 (the default) is the demo's pre-training text: the target is just the answer."""
    for r in numbers_corpus(50, 2):
        assert "Question" not in r.target and "." not in r.target


def test_annotation_names_exactly_the_items_the_question_uses():
    """annotate=True: "Answer: <a>" <- the items named in the question, found as spans in the text;
    the same records otherwise (the annotation draws nothing from the generator)."""
    plain, annotated = numbers_corpus(200, 3), numbers_corpus(200, 3, annotate=True)
    assert [r.text for r in plain] == [r.text for r in annotated]
    for r in annotated:
        (key, values), = r.important
        question = _QA.findall(r.text)[0][0]
        m = (re.fullmatch(r"What is (.+?)(?: plus (.+))?\?", question)
             or re.fullmatch(r"Is (.+?) (?:greater than (.+)|plus (.+) above \d+|above \d+)\?", question))
        named = [g for g in m.groups() if g]
        assert key == "Answer: " + r.target
        assert sorted(v.split(": ")[0] for v in values) == sorted(set(named)), (question, values)
        assert all(f"{v}," in r.input or f"{v}." in r.input for v in values)  # whole items of the text
    with pytest.raises(ValueError, match="questions=1"):
        numbers_corpus(1, 0, questions=2, annotate=True)
