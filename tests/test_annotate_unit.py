"""The annotator's pure parts: answer parsing, validation, prompts, ids and resume state."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cat_ds.annotate.parsing import ParseError, parse_answer, validate_pairs
from cat_ds.annotate.prompts import (
    DEFAULT_EXAMPLES,
    load_examples,
    load_template,
    render_examples,
    render_prompt,
)
from cat_ds.annotate.runner import AnnotateError, resolve_api_key
from cat_ds.annotate.store import (
    JsonlAppender,
    OutputLocked,
    load_done,
    pending_indices,
    read_raw_records,
    record_id,
)
from cat_ds.data.records import load_records, normalize_target

EXPECTED = [("Answer: 9", ["x 4", "y 5"])]


@pytest.mark.parametrize(
    "answer",
    [
        '[{"Answer: 9": ["x 4", "y 5"]}]',
        'Sure! Here it is:\n```json\n[{"Answer: 9": ["x 4", "y 5"]}]\n```\nHope this helps.',
        "```\n[{\"Answer: 9\": [\"x 4\", \"y 5\"]}]\n```",
        '{"Answer: 9": ["x 4", "y 5"]}',  # plain-object shape
        '{"important": [{"Answer: 9": ["x 4", "y 5"]}]}',
        'The pairs are [{"Answer: 9": ["x 4", "y 5"]}] as requested.',
        '```json\n[{"Answer: 9": ["x 4", "y 5"],}]\n```\n[{"Answer: 9": ["x 4", "y 5"]}]',  # broken fence, good JSON after
    ],
)
def test_parse_answer_accepts_the_shapes(answer):
    assert parse_answer(answer) == EXPECTED


def test_parse_answer_details():
    assert parse_answer('{"Answer: 9": "x 4"}') == [("Answer: 9", ["x 4"])]  # single string value
    assert parse_answer('[{"15": [24, "sold 9"]}]') == [("15", ["24", "sold 9"])]  # numbers -> text
    assert parse_answer("[]") == []  # "no causal pairs" is an answer, not garbage
    two = parse_answer('[{"a b": ["c"], "d e": ["f"]}]')  # several keys in one object
    assert two == [("a b", ["c"]), ("d e", ["f"])]


@pytest.mark.parametrize(
    "answer, fragment",
    [
        (None, "empty answer"),
        ("   ", "empty answer"),
        ("I cannot help with that.", "no JSON"),
        ('{"Answer: 9": {"x 4": 1}}', "expected a string or a list of strings"),
        ('[{"Answer: 9": [true]}]', "expected a string, got a boolean"),
        ('["x 4"]', "expected an object"),
    ],
)
def test_parse_answer_rejects_garbage(answer, fragment):
    with pytest.raises(ParseError, match=fragment):
        parse_answer(answer)


TEXT = "Item: x 4, y 5, z 15. Answer: 9"


def test_validate_pairs_keeps_and_drops_by_reason():
    important = [
        ("Answer: 9", ["x 4", "y 5", "Nope: 1", "x 4"]),  # duplicate value kept once
        ("Ghost", ["x 4"]),
        ("x 4", ["Answer: 9"]),  # key before its value
        ("Answer: 9", ["z 15"]),  # duplicate key merged
        ("Answer: 9", ["5"]),  # a standalone "5" occurs (in "y 5")
        ("Answer: 9", ["1"]),  # "1" only inside "15": not an occurrence under the rule
    ]
    kept, dropped, details = validate_pairs(TEXT, important)
    assert kept == [("Answer: 9", ["x 4", "y 5", "z 15", "5"])]
    assert dropped == Counter(value_not_found=2, key_not_found=1, key_not_after_value=1)
    assert {"key": "x 4", "value": "Answer: 9", "reason": "key_not_after_value"} in details
    assert {"key": "Answer: 9", "value": "1", "reason": "value_not_found"} in details


def test_validate_pairs_uses_any_occurrence_order():
    # "a" occurs before and after "b": some key occurrence after some value occurrence suffices.
    kept, dropped, _ = validate_pairs("a b a", [("a", ["b"])])
    assert kept == [("a", ["b"])] and not dropped
    kept, dropped, _ = validate_pairs("a b", [("a", ["b"])])
    assert kept == [] and dropped == Counter(key_not_after_value=1)


def test_default_examples_hold_under_the_rule():
    for rec in load_examples(None):
        kept, dropped, details = validate_pairs(rec.text, rec.important)
        assert not dropped, (rec.input[:40], details)
        assert kept == rec.important
    kinds = {type(e["target"]) for e in DEFAULT_EXAMPLES}
    assert kinds == {str, int}  # a numeric target (MAWPS/SVAMP) is covered too


def test_prompt_rendering_is_single_pass(tmp_path):
    tpl = "E:{examples}|I:{input}|T:{target}|{other}"
    out = render_prompt(tpl, "ex{input}", "in {target}", "42")
    assert out == "E:ex{input}|I:in {target}|T:42|{other}"
    default = render_prompt(load_template(None), render_examples(load_examples(None)), "QQQ", "7")
    assert "QQQ" in default and "ANSWER:" in default and "Weight: 4" in default
    bad = tmp_path / "t.txt"
    bad.write_text("only {input}")
    with pytest.raises(ValueError, match=r"t.txt: prompt template lacks the placeholder\(s\) \{target\}"):
        load_template(bad)
    ex = tmp_path / "ex.jsonl"
    ex.write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    with pytest.raises(ValueError, match="ex.jsonl:1: important: an example needs"):
        load_examples(ex)


def test_record_id_and_pending_with_duplicates():
    assert record_id({"id": "r1", "idx": 3, "input": "a", "target": "b"}) == 'id:"r1"'
    assert record_id({"idx": 3, "input": "a", "target": "b"}) == "idx:3"
    h = record_id({"input": "a", "target": 32})
    assert h == record_id({"input": "a", "target": "32", "other": 1})  # training text decides
    assert h != record_id({"input": "a", "target": "33"})
    raw = [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}, {"input": "a", "target": "b"}]
    done = Counter({record_id(raw[0]): 1})
    todo, ids = pending_indices(raw, done)
    assert todo == [1, 2]  # the second identical record is still owed
    assert pending_indices(raw, Counter({ids[0]: 2, ids[1]: 1}))[0] == []


def test_load_done_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with JsonlAppender(out) as fh:
        fh.write({"input": "a", "target": "b", "idx": 1, "important": []})
    good = out.read_bytes()
    out.write_bytes(good + b'{"input": "c", "targ')
    done, cut = load_done(out)
    assert done == Counter({"idx:1": 1}) and cut == len(b'{"input": "c", "targ')
    assert out.read_bytes() == good
    out.write_bytes(b"not json\n" + good)
    with pytest.raises(ValueError, match=r"out.jsonl:1: existing output line is not valid JSON"):
        load_done(out)
    assert load_done(tmp_path / "missing.jsonl") == (Counter(), 0)


def test_read_raw_records_keeps_the_objects(tmp_path):
    recs = [{"idx": 0, "input": "q", "target": 32, "type": "math"}, {"input": "r", "target": "s"}]
    jl = tmp_path / "in.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    arr = tmp_path / "in.json"
    arr.write_text(json.dumps(recs, indent=1))
    assert read_raw_records(jl) == recs == read_raw_records(arr)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: target: missing required field"):
        read_raw_records(bad)
    assert normalize_target(recs[0]["target"], "") == load_records(jl)[0].target


def test_api_key_resolution(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("CAT_TEST_KEY", raising=False)
    with pytest.raises(AnnotateError, match="set the environment variable CAT_TEST_KEY"):
        resolve_api_key("CAT_TEST_KEY", None)
    assert resolve_api_key("CAT_TEST_KEY", "http://127.0.0.1:1/v1") == "EMPTY"
    monkeypatch.setenv("CAT_TEST_KEY", "k-123")
    assert resolve_api_key("CAT_TEST_KEY", None) == "k-123"


def test_output_lock_excludes_a_second_writer(tmp_path):
    out = tmp_path / "out.jsonl"
    with JsonlAppender(out, lock=True):
        with pytest.raises(OutputLocked, match="out.jsonl: another process"):
            JsonlAppender(out, lock=True)
    JsonlAppender(out, lock=True).close()  # released on close
