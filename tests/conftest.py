"""Shared fixtures: generated STG data, locally trained tokenizers of both families, and
tiny random-init Llama / Qwen2 models (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # console scripts (cat-ds, deepspeed) live here

# Keep the 2-core CI machine from oversubscribing: every torch process uses one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Every rank a test starts (and in-process engines) trains on CPU/gloo in fp32, GPU or not: the
# exactness asserts and the 2-rank tests on a 1-GPU machine need it. tests/test_gpu.py asks for CUDA.
from cat_ds.engine.device import device_env  # noqa: E402  (torch-free)

for _k, _v in device_env("cpu").items():
    os.environ.setdefault(_k, _v)


def load_bench_script(name: str):
    """A `bench/<name>.py` script as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def stg_dir(tmp_path_factory) -> Path:
    from cat_ds.data.stg import write_stg

    d = tmp_path_factory.mktemp("stg")
    write_stg(d, task="stg", train_size=64, seed=0, test_size=32)
    return d


@pytest.fixture(scope="session")
def stg_h_dir(tmp_path_factory) -> Path:
    from cat_ds.data.stg import write_stg

    d = tmp_path_factory.mktemp("stg_h")
    write_stg(d, task="stg_h", train_size=64, seed=0, test_size=32)
    return d


@pytest.fixture(scope="session")
def tokenizer_corpus(tmp_path_factory) -> list[Path]:
    """STG + STG_H + math-word-problem text, so both families see every kind of record."""
    from cat_ds.data.stg import write_stg

    d = tmp_path_factory.mktemp("tokcorpus")
    write_stg(d / "stg", task="stg", train_size=200, seed=1, test_size=10)
    write_stg(d / "stg_h", task="stg_h", train_size=200, seed=1, test_size=10)
    math = d / "math.txt"
    math.write_text(
        "\n".join(
            f"Tom has {a} apples and buys {b} more. How many apples does Tom have now? "
            f"Answer: {a + b}. He gives {c} away #### {a + b - c}"
            for a, b, c in [(3, 5, 2), (12, 7, 4), (40, 2, 9), (8, 8, 8), (15, 30, 5)] * 20
        )
    )
    return [d / "stg" / "train.jsonl", d / "stg_h" / "train.jsonl", math]


def _train(tmp_path_factory, corpus, kind):
    from cat_ds.data.tokenizers import load_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp(f"tok_{kind}")
    train_tokenizer(corpus, kind, 512, out)
    return load_tokenizer(out)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, tokenizer_corpus):
    return _train(tmp_path_factory, tokenizer_corpus, "bpe")


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, tokenizer_corpus):
    return _train(tmp_path_factory, tokenizer_corpus, "sentencepiece")


@pytest.fixture(scope="session", params=["bpe", "sentencepiece"])
def any_tokenizer(request):
    return request.getfixturevalue("bpe_tokenizer" if request.param == "bpe" else "sp_tokenizer")


def tiny_model(family: str = "llama", vocab_size: int = 512, *, gqa: bool = True, layers: int = 2,
               hidden: int = 64, heads: int = 4, dtype=None, seed: int = 0, attn: str = "sdpa"):
    """A tiny random-init causal LM of the Llama or Qwen2 family (GQA: 2 KV heads)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = LlamaConfig if family == "llama" else Qwen2Config
    cfg = cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if gqa else heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> Path:
    """A model cache holding the real SmolLM2-135M-Instruct, converted once per session by
    cat_ds.sources.resolve (~35 s). Point CAT_DS_MODEL_CACHE at it to use it."""
    from cat_ds.sources import resolve

    d = tmp_path_factory.mktemp("model_cache")
    old = os.environ.get("CAT_DS_MODEL_CACHE")
    os.environ["CAT_DS_MODEL_CACHE"] = str(d)
    try:
        resolve("smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("CAT_DS_MODEL_CACHE")
        else:
            os.environ["CAT_DS_MODEL_CACHE"] = old
    return d
