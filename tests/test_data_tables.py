"""Record sources through `datasets`: parquet, CSV, save_to_disk directories and hub ids, with
mapped column names; errors keep naming the source and the row (CSV: the line)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cat_ds.data.records import RecordError, load_records

CAT_DS = str(Path(sys.executable).with_name("cat-ds"))
ROWS = [{"question": "Smoking: 3, Weight: 4 Answer: ", "answer": "Low Risk",
         "causal": json.dumps([{"Low Risk": ["Smoking: 3", "Weight: 4"]}]), "id": 0},
        {"question": "Smoking: 9, Weight: 8 Answer: ", "answer": "High Risk", "causal": None, "id": 1}]
COLUMNS = {"input": "question", "target": "answer", "important": "causal"}


@pytest.fixture
def sources(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.to_csv(str(tmp_path / "t.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    return tmp_path


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "saved"])
def test_each_source_gives_the_records_a_jsonl_would(sources, name):
    recs = load_records(sources / name, columns=COLUMNS)
    assert [(r.input, r.target) for r in recs] == [(x["question"], x["answer"]) for x in ROWS]
    assert recs[0].important == [("Low Risk", ["Smoking: 3", "Weight: 4"])] and recs[1].important is None
    assert recs[0].extra == {"id": 0}


def test_globs_mix_sources_and_a_dataset_dict_names_its_splits(sources):
    assert len(load_records([str(sources / "t.*")], columns=COLUMNS)) == 4  # t.csv, t.parquet
    with pytest.raises(FileNotFoundError, match=r"a saved DatasetDict \(train, test\).*dict/train"):
        load_records(sources / "dict", columns=COLUMNS)


def test_errors_name_the_row_or_the_csv_line(sources, tmp_path):
    import datasets

    bad = [{**ROWS[0]}, {**ROWS[1], "causal": "[{broken"}, {**ROWS[1], "answer": None}]
    datasets.Dataset.from_list(bad).to_csv(str(tmp_path / "bad.csv"), index=False)
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(RecordError) as e:
        load_records(tmp_path / "bad.csv", collect_errors=True, columns=COLUMNS)
    assert e.value.errors[0].startswith("bad.csv:3: important: invalid JSON")  # line 1 is the header
    assert e.value.errors[1].startswith("bad.csv:4: target")
    with pytest.raises(RecordError) as e:
        load_records(tmp_path / "bad.parquet", collect_errors=True, columns=COLUMNS)
    assert e.value.errors[0].startswith("bad.parquet: row 1: important") and e.value.errors[1].startswith("bad.parquet: row 2:")
    with pytest.raises(RecordError, match=r"t.parquet: row 0: prompt: missing column \(data.columns maps it to input\)"):
        load_records(sources / "t.parquet", columns={**COLUMNS, "input": "prompt"})


def test_a_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"org/stg:train: the hub could not serve dataset 'org/stg' split "
                                                r"'train' .*offline, use local files"):
        load_records("org/stg:train")


def test_validate_and_train_read_mapped_parquet(sources, tmp_path, stg_dir, bpe_tokenizer):
    p = subprocess.run([CAT_DS, "data", "validate", str(sources / "t.parquet"), "--column", "input=question",
                        "--column", "target=answer", "--column", "important=causal"], capture_output=True, text=True)
    assert p.returncode == 0 and "2 records OK (1 with causal supervision)" in p.stdout, p.stderr
    # The engine end to end on a parquet training set with mapped columns and a CSV eval set.
    import datasets

    from engine_helpers import write_config

    recs = [json.loads(line) for line in (stg_dir / "train.jsonl").read_text().splitlines()[:16]]
    datasets.Dataset.from_list([{"question": r["input"], "answer": r["target"],
                                 "causal": json.dumps(r["important"])} for r in recs]).to_parquet(str(tmp_path / "tr.parquet"))
    datasets.Dataset.from_list([{"question": r["input"], "answer": r["target"]} for r in recs[:4]]).to_csv(
        str(tmp_path / "ev.csv"), index=False)
    cfg = write_config(tmp_path, "pq", stg_dir=stg_dir, tokenizer_dir=bpe_tokenizer.name_or_path, train={"max_steps": 2},
                       data={"train": str(tmp_path / "tr.parquet"), "eval": {"iid": str(tmp_path / "ev.csv")},
                             "columns": COLUMNS, "max_length": 128, "cache_dir": str(tmp_path / "cache")},
                       eval={"batch_size": 4, "probe_size": 2})
    t = subprocess.run([CAT_DS, "train", str(cfg), "--ds-config", "zero2"], capture_output=True, text=True, timeout=600)
    assert t.returncode == 0, t.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pq" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("cat_loss", 0) != 0 for r in rows) and any(r.get("eval/iid/n") == 4 for r in rows)
