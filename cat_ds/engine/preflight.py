"""What the launching process checks before any rank starts. Cheap on purpose (no torch, no
DeepSpeed, no transformers): `cat-ds train` runs it before torchrun, and every second here
is a second before the first step."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cat_ds.choices import parse_heads, parse_layers
from cat_ds.config import Config, ConfigError, read_text
from cat_ds.engine.ds_config import checkpoint_root, fill_ds_config, load_ds_config


def check(cfg: Config, ds_config_path: str, world_size: int, resume: str | None = "auto") -> dict:
    """Everything that can be checked without data or a model: raises ConfigError."""
    ds_config = load_ds_config(ds_config_path)
    fill_ds_config(ds_config, cfg, world_size=world_size, src=ds_config_path)  # batch arithmetic, fp16-on-CPU
    check_cat_shape(cfg, local_model_config(cfg))  # a hub or GGUF model: checked again once its config loads
    latest = checkpoint_root(cfg.output_dir) / "latest"
    if resume != "auto" and latest.exists():
        # A fresh run would interleave its checkpoints with the old ones (and keep-last-K could
        # then prune the new ones): refuse instead of guessing.
        raise ConfigError(f"output_dir {cfg.output_dir} already holds checkpoints of a run ({latest}): "
                          "continue it with --resume auto, or choose another output_dir")
    return ds_config


def local_model_config(cfg: Config) -> dict | None:
    """The model's config.json as a dict where it is a local file (model.config, or a model directory);
    None for a hub id or a GGUF (known once the model source is resolved)."""
    spec = cfg.model.config or cfg.model.name_or_path
    path = Path(spec).expanduser() if spec else None
    path = path / "config.json" if path is not None and path.is_dir() else path
    if path is None or not path.is_file() or path.suffix != ".json":
        return None
    try:
        return json.loads(read_text(path, "model config"))
    except (json.JSONDecodeError, ConfigError):
        return None  # check_model reports it


def check_cat_shape(cfg: Config, model_config: dict | None) -> None:
    """`cat.layers` / `cat.heads` fit the model's layer and head counts (their form: config.validate)."""
    if not cfg.cat.enabled or not model_config:
        return
    for key, rule, spec, n in (("cat.layers", parse_layers, cfg.cat.layers, model_config.get("num_hidden_layers")),
                               ("cat.heads", parse_heads, cfg.cat.heads, model_config.get("num_attention_heads"))):
        try:
            if isinstance(n, int):
                rule(spec, n)
        except ValueError as e:
            raise ConfigError(f"{key}: {str(e).split(': ', 1)[1]}") from None


WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _looks_like_path(spec: str) -> bool:
    """A hub id is `org/name` (one slash); anything else with a path shape is meant as a local path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") >= 2 or spec.endswith(".gguf") or "\\" in spec


def _json_file(path: Path, key: str) -> None:
    try:
        json.loads(read_text(path, "model config"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_model(cfg: Config) -> None:
    """The model (and tokenizer) a run names exist in a shape that loads, before any rank starts."""
    from cat_ds.sources import NAMED, SourceError, named_gguf

    m = cfg.model
    if m.config and not Path(m.config).is_file():
        raise ConfigError(f"model.config: {m.config}: no such file (a Hugging Face config.json to build a model from)")
    if m.config:
        _json_file(Path(m.config), "model.config")
    if m.tokenizer and not Path(m.tokenizer).exists() and not m.train_tokenizer and _looks_like_path(m.tokenizer):
        raise ConfigError(f"model.tokenizer: {m.tokenizer}: no such directory")
    spec = m.name_or_path
    if not spec:
        return
    if spec in NAMED:
        try:
            named_gguf(spec)
        except SourceError as e:
            raise ConfigError(f"model.name_or_path: {e}") from None
        return
    expected = ("expected a Hugging Face model directory (config.json, weights, tokenizer), a .gguf file, "
                f"one of {', '.join(NAMED)}, or a hub id (org/name)")
    path = Path(spec).expanduser()
    if path.is_file():
        _check_gguf_file(path, spec, expected)
    elif path.is_dir():
        _check_model_dir(path, spec, expected, has_tokenizer=bool(m.tokenizer))
    elif _looks_like_path(spec):
        raise ConfigError(f"model.name_or_path: {spec}: no such file or directory; {expected}")


def _check_gguf_file(path: Path, spec: str, expected: str) -> None:
    """Readable and named .gguf; its content (magic bytes, architecture) is checked when it is converted."""
    if path.suffix != ".gguf":
        raise ConfigError(f"model.name_or_path: {spec}: a file, but not a .gguf; {expected}")
    try:
        with open(path, "rb") as fh:
            fh.read(4)
    except OSError as e:
        raise ConfigError(f"model.name_or_path: {spec}: cannot read this file: {e.strerror or e}") from None


def _check_model_dir(path: Path, spec: str, expected: str, has_tokenizer: bool) -> None:
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {spec}: no config.json in this directory; {expected}")
    _json_file(path / "config.json", "model.name_or_path")
    if not any(next(path.glob(w), None) for w in WEIGHTS):
        raise ConfigError(f"model.name_or_path: {spec}: no weights (*.safetensors or pytorch_model*.bin) "
                          "in this directory")
    if not has_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.name_or_path: {spec}: no tokenizer in this directory (tokenizer.json, ...); "
                          "add one or set model.tokenizer")


def _generated_records(path: Path) -> int:
    """Records of a data/stg_* file that the main rank will generate (its size is known from the name)."""
    from cat_ds.data.stg import STG_DIR_SIZES, resolve_sizes

    task, size = STG_DIR_SIZES[path.parent.name]
    return getattr(resolve_sizes(task, size), path.stem, 0)


def check_data(cfg: Config, max_errors: int = 20) -> int:
    """Every data file exists (or is an STG set the run generates) and every record is valid: all
    errors of all files in one report, before any rank starts. Returns the number of training
    records (what cat_ds/schedule.py needs), counting a file still to be generated by its size."""
    from cat_ds.data.records import RecordError, expand_paths, load_records
    from cat_ds.data.stg import generation_command

    files = [("data.train", p) for p in cfg.data.train] + [(f"data.eval.{k}", p) for k, p in cfg.data.eval.items()]
    present: dict[bool, list] = {True: [], False: []}  # is a training file -> paths
    generated = 0
    for key, p in files:
        try:
            present[key == "data.train"] += expand_paths(p)
        except FileNotFoundError as e:
            cmd = generation_command(Path(p))
            if cmd is not None and cfg.data.generate_stg:  # the main rank generates it (data.generate_stg)
                generated += _generated_records(Path(p)) if key == "data.train" else 0
                continue
            hint = f"; generate it with: {cmd}" if cmd else ""
            raise ConfigError(f"{key}: {e}{hint}") from None
    errors, n_train = [], 0
    for train, paths in present.items():
        try:
            n = len(load_records(paths, collect_errors=True, columns=cfg.data.columns))
        except FileNotFoundError as e:  # a hub dataset offline, a saved DatasetDict without a split
            raise ConfigError(str(e)) from None
        except RecordError as e:
            errors += e.errors
            continue
        n_train += n if train else 0
    if errors:
        shown = "\n".join(errors[:max_errors])
        more = f"\n... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise ConfigError(f"{len(errors)} invalid record(s):\n{shown}{more}")
    return n_train + generated


def check_schedule_at(cfg: Config, world_size: int, num_records: int, src: str = "config"):
    """The run's Schedule at this world size; ConfigError (one line) if it is degenerate."""
    from cat_ds.schedule import check_schedule, schedule

    s = schedule(cfg, world_size, num_records)
    check_schedule(s, cfg, src)
    return s


def check_port(port: int | None) -> None:
    if port is None:
        return
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"--master-port {port}: already in use on this machine; choose another or omit it") from None


def threads_per_rank(ranks_on_node: int) -> int:
    """CPU threads for one rank: this process's usable cores shared by the node's ranks.
    (torchrun's default of 1 thread per rank leaves half of a 2-core machine idle on 1 rank.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, ranks_on_node))
