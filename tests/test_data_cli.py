"""The data commands, end to end through the real `cat-ds` console script."""

import json
import subprocess

import pytest

from conftest import VENV_BIN

MATH = [
    {"input": "Tom has 3 apples and buys 5 more. How many apples does Tom have now? ",
     "target": "He had 3 apples and bought 5, so 3 + 5 = 8. #### 8",
     "important": [{"#### 8": ["3 apples", "5 more"]}, {"3 + 5": ["3 apples", "buys 5"]}]},
    {"input": "A box holds 12 pens. 4 are red. How many are not red? Answer: ", "target": 8.0,
     "important": {"Answer: 8.0": ["12 pens", "4 are red"], "Answer: 9": "12 pens"}},
    {"input": "No annotation here. Answer: ", "target": "1"},
]


def cat_ds(*args, check=True):
    p = subprocess.run([str(VENV_BIN / "cat-ds"), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"cat-ds {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer_corpus):
    d = tmp_path_factory.mktemp("clitok")
    args = ["tokenizer", "train", "--kind", "bpe", "--vocab-size", "400", "--out", d]
    for f in tokenizer_corpus:
        args += ["--data", f]
    cat_ds(*args)
    return d


def _check_schema(lines, n_records):
    objs = [json.loads(line) for line in lines]
    assert len(objs) == n_records + 1
    for i, o in enumerate(objs[:-1]):
        assert set(o) == {"index", "n_tokens", "answer_start", "rows", "skipped"} and o["index"] == i
        qs = [q for q, _ in o["rows"]]
        assert qs == sorted(qs) and len(set(qs)) == len(qs)
        for q, cols in o["rows"]:
            assert cols == sorted(cols) and all(0 <= c < q for c in cols) and q < o["n_tokens"]
        assert all(set(s) == {"phrase", "reason"} for s in o["skipped"])
    assert set(objs[-1]) == {"summary"} and objs[-1]["summary"]["records"] == n_records
    return objs


@pytest.mark.parametrize("task", ["stg", "stg_h"])
def test_generate_and_inspect_json(tmp_path, tok_dir, task):
    out = tmp_path / task
    cat_ds("data", "stg", "--task", task, "--train-size", "30", "--test-size", "10", "--seed", "1", "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test_iid.jsonl", "test_ood.jsonl", "train.jsonl"]
    p = cat_ds("data", "inspect", out / "train.jsonl", "--tokenizer", tok_dir, "--json")
    objs = _check_schema(p.stdout.splitlines(), 30)
    s = objs[-1]["summary"]
    assert s["records_with_supervision"] == 30 and s["skipped"] == {} and s["supervised_rows"] > 30


def test_inspect_math_word_problems(tmp_path, tok_dir):
    f = tmp_path / "math.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in MATH))
    p = cat_ds("data", "inspect", f, "--tokenizer", tok_dir, "--json")
    objs = _check_schema(p.stdout.splitlines(), 3)
    assert objs[0]["rows"] and objs[1]["rows"] and objs[2]["rows"] == []
    assert objs[1]["skipped"] == [{"phrase": "Answer: 9", "reason": "not_found"}]
    assert objs[-1]["summary"]["records_with_supervision"] == 2
    human = cat_ds("data", "inspect", f, "--tokenizer", tok_dir).stdout
    assert "record 0 (math.jsonl:1)" in human and "skipped: 'Answer: 9' (not_found)" in human
    assert "summary:" in human and "supervised_rows" in human


def test_bad_file_is_reported_with_file_line_field(tmp_path, tok_dir):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(MATH[0]) + "\n" + '{"input": "x", "target": "y", "important": [{"k": [5]}]}\n')
    p = cat_ds("data", "inspect", f, "--tokenizer", tok_dir, check=False)
    assert p.returncode != 0 and 'train.jsonl:2: important[0]["k"][0]: expected a string, got 5' in p.stderr
    p = cat_ds("data", "validate", f, check=False)
    assert p.returncode != 0 and "train.jsonl:2:" in p.stderr
    p = cat_ds("data", "stg", "--train-size", "huge", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "train size" in p.stderr
