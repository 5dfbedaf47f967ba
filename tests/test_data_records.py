import json

import pytest

from cat_ds.data.records import RecordError, load_records, normalize_important


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = {"input": "a b c Answer: ", "target": "X", "important": [{"X": ["a", "b"]}]}


def test_normalises_both_important_shapes_and_numbers(tmp_path):
    p = _write(tmp_path, "t.jsonl", [
        json.dumps(GOOD),
        json.dumps({"input": "q", "target": 32, "important": {"Answer: 32": "q", "k2": ["q"]}, "idx": 7}),
        json.dumps({"input": "q", "target": 80.0}),
        json.dumps({"input": "q", "target": "y", "important": None}),
        json.dumps({"input": "q", "target": "y", "important": [{"a": ["b"], "c": "d"}]}),
    ])
    r = load_records(p)
    assert r[0].important == [("X", ["a", "b"])]
    assert r[1].target == "32" and r[1].important == [("Answer: 32", ["q"]), ("k2", ["q"])]
    assert r[1].extra == {"idx": 7} and r[1].source == "t.jsonl:2"
    assert r[2].target == "80.0" and r[2].important is None
    assert r[3].important is None
    assert r[4].important == [("a", ["b"]), ("c", ["d"])]
    assert r[0].text == "a b c Answer: X"


def test_json_array_files_and_globs(tmp_path):
    (tmp_path / "a.json").write_text("[\n" + json.dumps(GOOD) + ",\n  " + json.dumps({"input": 1, "target": "x"}) + "\n]")
    with pytest.raises(RecordError, match=r"^a\.json:3: input: expected a string, got 1$"):
        load_records(tmp_path / "a.json")
    _write(tmp_path, "p1.jsonl", [json.dumps(GOOD)])
    _write(tmp_path, "p2.jsonl", [json.dumps(GOOD), json.dumps(GOOD)])
    assert len(load_records(str(tmp_path / "p*.jsonl"))) == 3
    assert len(load_records([tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"])) == 3
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_records(str(tmp_path / "zz*.jsonl"))


BAD = [
    ('{"input": "q", "target": "y", "important": [{"Answer: 3": ["a", 5]}]}',
     'train.jsonl:1: important[0]["Answer: 3"][1]: expected a string, got 5'),
    ('{"input": "q", "target": "y", "important": [{"k": ["a"]}, {"k": ["b"]}, {"Answer: 3": [5]}]}',
     'train.jsonl:1: important[2]["Answer: 3"][0]: expected a string, got 5'),
    ('{"input": "q", "target": "y", "important": {"k": 3}}',
     'train.jsonl:1: important["k"]: expected a string or a list of strings, got 3'),
    ('{"input": "q", "target": "y", "important": ["k"]}',
     "train.jsonl:1: important[0]: expected an object, got a string"),
    ('{"input": "q", "target": "y", "important": "k"}',
     "train.jsonl:1: important: expected a list of objects or an object, got a string"),
    ('{"input": "q", "target": [1]}', "train.jsonl:1: target: expected a string or a number, got a list"),
    ('{"input": "q", "target": true}', "train.jsonl:1: target: expected a string or a number, got a boolean"),
    ('{"target": "y"}', "train.jsonl:1: input: missing required field"),
    ('{"input": "q"}', "train.jsonl:1: target: missing required field"),
    ('{"input": null, "target": "y"}', "train.jsonl:1: input: expected a string, got null"),
    ('"just text"', "train.jsonl:1: expected a JSON object, got a string"),
    ('{"input": "q", "target": "y"', "train.jsonl:1: invalid JSON: Expecting ',' delimiter (column 29)"),
    ('{"input": "q", "target": "y", "important": [{"": ["a"]}]}', 'train.jsonl:1: important[0][""]: empty key phrase'),
]


@pytest.mark.parametrize("line,message", BAD)
def test_malformed_records_have_exact_errors(tmp_path, line, message):
    p = _write(tmp_path, "train.jsonl", [line])
    with pytest.raises(RecordError) as e:
        load_records(p)
    assert str(e.value) == message


def test_error_names_the_line_and_collects_all(tmp_path):
    lines = [json.dumps(GOOD)] * 16 + [BAD[1][0], json.dumps(GOOD), BAD[5][0]]
    p = _write(tmp_path, "train.jsonl", lines)
    with pytest.raises(RecordError) as e:
        load_records(p)
    assert str(e.value) == 'train.jsonl:17: important[2]["Answer: 3"][0]: expected a string, got 5'
    with pytest.raises(RecordError) as e:
        load_records(p, collect_errors=True)
    assert [m.split(":")[1] for m in e.value.errors] == ["17", "19"]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    p = _write(tmp_path, "t.jsonl", [json.dumps(GOOD), "", '{"input": 3, "target": "x"}'])
    with pytest.raises(RecordError, match=r"^t\.jsonl:3: input"):
        load_records(p)


def test_normalize_important_keeps_order():
    assert normalize_important([{"b": "1"}, {"a": ["2", "3"]}]) == [("b", ["1"]), ("a", ["2", "3"])]
    assert normalize_important(None) is None
