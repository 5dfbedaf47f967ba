"""What `cat-ds train` finds before any rank starts: one short error naming the file, line or key
(no traceback, no torch elastic report), and nothing started."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CAT_DS = str(Path(sys.executable).with_name("cat-ds"))


def _train(tmp_path, *, model=None, data=None, args=(), ds="ds_configs/zero3.json"):
    cfg = {"output_dir": str(tmp_path / "run"),
           "model": model or {"name_or_path": "smollm2-135m-instruct"},
           "data": data or {"train": str(tmp_path / "train.jsonl")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([CAT_DS, "train", str(path), "--ds-config", ds, *args], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists(), p.stderr
    assert len(p.stderr.strip().splitlines()) < 5, p.stderr
    return p.stderr


@pytest.fixture
def good_data(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"input": "a ", "target": "b"}) + "\n")


def test_a_missing_model_path_is_one_line(tmp_path, good_data):
    err = _train(tmp_path, model={"name_or_path": str(tmp_path / "no_model")})
    assert f"model.name_or_path: {tmp_path / 'no_model'}: no such file or directory" in err
    assert "a .gguf file" in err and "smollm2-135m-instruct" in err


def test_a_model_directory_without_weights_or_tokenizer(tmp_path, good_data):
    d = tmp_path / "m"
    d.mkdir()
    assert "no config.json in this directory" in _train(tmp_path, model={"name_or_path": str(d)})
    (d / "config.json").write_text("{}")
    assert "no weights" in _train(tmp_path, model={"name_or_path": str(d)})
    (d / "model.safetensors").write_bytes(b"x")
    assert "no tokenizer in this directory" in _train(tmp_path, model={"name_or_path": str(d)})


def test_missing_data_and_ds_config_files(tmp_path, good_data):
    err = _train(tmp_path, data={"train": str(tmp_path / "nope.jsonl")})
    assert f"data.train: {tmp_path / 'nope.jsonl'}: no such file" in err
    err = _train(tmp_path, data={"train": str(tmp_path / "train.jsonl"), "eval": {"ood": "x/ood.jsonl"}})
    assert "data.eval.ood: x/ood.jsonl: no such file" in err
    assert "zero9.json: DeepSpeed config not found" in _train(tmp_path, ds="ds_configs/zero9.json")


def test_every_bad_record_of_every_file_stops_training_before_it_starts(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": 5, "target": "b"}\n'
                                          '{"input": "a", "target\n')
    (tmp_path / "iid.jsonl").write_text('{"input": "a"}\n')
    p = subprocess.run([CAT_DS, "data", "validate", str(tmp_path / "train.jsonl"), str(tmp_path / "iid.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    for where in ("train.jsonl:2: input: expected a string", "train.jsonl:3: invalid JSON", "iid.jsonl:1: target"):
        assert where in p.stderr, p.stderr
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": "smollm2-135m-instruct"},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval": {"iid": str(tmp_path / "iid.jsonl")}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    t = subprocess.run([CAT_DS, "train", str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert t.returncode != 0 and "3 invalid record(s)" in t.stderr and "iid.jsonl:1: target" in t.stderr, t.stderr
    assert not (tmp_path / "run").exists()


def test_validate_caps_the_list_and_counts_the_rest(tmp_path):
    (tmp_path / "many.jsonl").write_text('{"input": 1, "target": "b"}\n' * 30)
    p = subprocess.run([CAT_DS, "data", "validate", str(tmp_path / "many.jsonl")], capture_output=True, text=True,
                       timeout=60)
    assert p.stderr.count("input: expected a string") == 20 and "... and 10 more error(s)" in p.stderr


def test_a_port_in_use(tmp_path, good_data):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert f"--master-port {port}: already in use" in _train(tmp_path, args=("--master-port", str(port)))


# A regular file whose every read fails (EIO), even for root, whom `chmod 000` does not stop.
UNREADABLE = Path("/proc/self/mem")


@pytest.mark.skipif(not UNREADABLE.is_file(), reason="needs Linux /proc")
def test_unreadable_files_are_one_line_naming_them(tmp_path, good_data):
    def link(name: str) -> Path:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).symlink_to(UNREADABLE)
        return tmp_path / name

    ds, data, gguf, cfg = link("ds.json"), link("bad.jsonl"), link("w.gguf"), link("cfg.yaml")
    assert f"{ds}: cannot read this DeepSpeed config: Input/output error" in _train(tmp_path, ds=str(ds))
    assert f"{data}: cannot read this file" in _train(tmp_path, data={"train": str(data)})
    m_cfg = link("m/config.json")
    err = _train(tmp_path, model={"name_or_path": str(m_cfg.parent)})
    assert f"model.name_or_path: {m_cfg}: cannot read this model config" in err
    assert f"model.name_or_path: {gguf}: cannot read this file" in _train(tmp_path, model={"name_or_path": str(gguf)})
    p = subprocess.run([CAT_DS, "train", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and p.stderr.strip() == f"Error: config error: {cfg}: cannot read this config file: " \
        "Input/output error", p.stderr
    # `data validate` lists it with the other files' errors; a file that is not UTF-8 is one error too.
    (tmp_path / "latin1.jsonl").write_bytes('{"input": "caf\xe9", "target": "b"}\n'.encode("latin-1"))
    (tmp_path / "iid.jsonl").write_text('{"input": "a"}\n')
    files = [str(data), str(tmp_path / "latin1.jsonl"), str(tmp_path / "iid.jsonl")]
    p = subprocess.run([CAT_DS, "data", "validate", *files], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    for where in (f"{data}: cannot read this file: Input/output error", f"{tmp_path / 'latin1.jsonl'}: cannot read "
                  "this file: 'utf-8' codec can't decode", "iid.jsonl:1: target"):
        assert where in p.stderr, p.stderr


def test_a_degenerate_schedule_is_one_line_before_any_rank(tmp_path):
    """16 x 4 records per step (the default batch) from 50 records: no step per epoch; 30 per step:
    40 % dropped each epoch. Both before the ranks (no run directory, no traceback)."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input": f"a{i} ", "target": "b"}) + "\n"
                                                  for i in range(50)))
    err = _train(tmp_path)
    assert "schedule at world size 1: an epoch has no optimizer step: 50 training records < global batch 64" in err
    err = _train(tmp_path, args=("--set", "train.micro_batch_size=30", "--set", "train.grad_accum=1"))
    assert "20 of 50 training records (40 %) are dropped every epoch" in err and len(err.strip().splitlines()) == 1
