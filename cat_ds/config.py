"""Typed run configuration: YAML -> dataclasses, strict, validated before any model loads.

    cfg = load_config("configs/stg_tiny.yaml", overrides=["train.lr=1e-4", "cat.heads=4"])

Unknown keys and wrong types raise `ConfigError` naming the file, the line (where YAML
knows it) and the dotted key. `--set key=value` values are parsed as YAML scalars and then
coerced to the field's type. The DeepSpeed JSON is cat_ds/engine/ds_config.py's.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cat_ds.choices import (AMPLITUDES, DTYPES, GRANULARITIES, LOSS_TYPES, NORMALIZATIONS, SCORER_NAMES,
                            TOKENIZER_KINDS, parse_heads, parse_layers)


PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR, DS_CONFIGS_DIR = PACKAGE_DIR / "configs", PACKAGE_DIR / "ds_configs"


def shipped(spec: str | Path, folder: Path, suffix: str) -> Path:
    """A path as given, or the name of a file shipped in the package (`zero3`, `smollm2_stg`)."""
    path = Path(spec)
    if path.exists() or len(path.parts) > 1:
        return path
    named = folder / (path.name if path.suffix == suffix else path.name + suffix)
    return named if named.is_file() else path


def shipped_names(folder: Path, suffix: str) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob(f"*{suffix}")))


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


def read_text(path: Path, what: str) -> str:
    """A file the run needs, as text; unreadable (permissions, I/O error, not UTF-8) is one ConfigError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{path}: cannot read this {what}: {reason}") from None


@dataclass
class LoraSettings:
    """`model.lora`: train low-rank adapters (peft) instead of every weight; absent = full fine-tuning."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # Hugging Face name or local dir (pretrained weights)
    config: str | None = None  # config JSON for a random-init model (tests, demo, benchmarks)
    tokenizer: str | None = None  # default: name_or_path
    train_tokenizer: str | None = None  # bpe | sentencepiece: train `tokenizer` on data.train if that dir is missing
    attn_implementation: str = "cat_sdpa"  # base and CAT use the same kernel: a fair comparison
    gradient_checkpointing: bool = False  # always non-reentrant (reentrant drops CAT gradients)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or bf16 | fp32
    lora: LoraSettings | None = None  # adapters on these modules (peft); None: full fine-tuning


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL/JSON/parquet/CSV files, globs, saved datasets, org/name:split
    eval: dict[str, str] = field(default_factory=dict)  # name -> source, e.g. {iid: ..., ood: ...}
    columns: dict[str, str] = field(default_factory=dict)  # record field -> the source's column, e.g. {input: question}
    max_length: int = 256
    cache_dir: str | None = None  # tokenised cache; default OUTPUT_DIR/.cache
    generate_stg: bool = True  # a missing data/stg_* dir is generated (see data.stg.ensure_stg)
    chat_template: bool = False  # render input/target as the model's user/assistant turns (data/chat.py)


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    grad_accum: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = -1  # > 0 overrides epochs
    epochs: int = 10
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_last: int = 2
    seed: int = 0
    grad_clip: float = 1.0
    lm_normalization: str = "micro"  # micro: mean per micro-batch (HF/research); global: per step
    log_every: int = 1
    export: bool = True  # write OUTPUT_DIR/export (HF safetensors + tokenizer) at the end
    allow_dropped_records: bool = False  # allow > 10 % of records per epoch dropped (cat_ds/schedule.py)


@dataclass
class CatConfig:
    enabled: bool = False
    alpha: float = 2.0
    loss_type: str = "div"
    heads: Union[str, int] = "all"  # "all" or K heads resampled per step from (seed, step)
    layers: Union[str, list[int]] = "all"  # "all", "last N" or a list of indices
    decay: float = 1.0
    amplitude: str = "epoch"  # epoch: exp(-decay*epoch) (research) | step: per-step | constant: 1
    normalization: str = "micro"  # micro (research) | global (invariant to micro/accum/world)
    granularity: str = "all"  # all (spec: one layer/head average) | layer | head: each must pass alpha
    min_gap: int = 1


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps; 0: only at the end (if data.eval is set)
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: derived from the targets
    scorer: str = "exact"
    limit: int | None = None  # evaluate only the first N records of each set
    newline_cut: bool | None = None  # cut at the first newline; None: on unless a target has one / gsm8k
    probe_size: int = 16  # supervised train records scored for per-layer attention ratios; 0: off
    attention_records: int = 4  # records per eval set drawn as attention pictures at each evaluation; 0: off
    best_metric: str | None = None  # e.g. eval/ood/accuracy: keep OUTPUT_DIR/best/checkpoints (one)
    best_mode: str = "max"  # max | min


@dataclass
class TrackingConfig:
    experiment: str = "cat-ds"
    run_name: str | None = None
    mlflow: bool = True  # every run is tracked in MLflow (metrics.jsonl is always written too)
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else SQLite under store_root
    store_root: str | None = None  # default: OUTPUT_DIR/../mlflow (shared by sibling runs, for compare)


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cat: CatConfig = field(default_factory=CatConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.train_tokenizer": (None, *TOKENIZER_KINDS),
    "model.dtype": DTYPES,
    "train.lm_normalization": NORMALIZATIONS,
    "cat.loss_type": LOSS_TYPES,
    "cat.amplitude": AMPLITUDES,
    "cat.normalization": NORMALIZATIONS,
    "cat.granularity": GRANULARITIES,
    "eval.best_mode": ("max", "min"),
    "eval.scorer": SCORER_NAMES,
}


# ------------------------------------------------------------------ YAML with line numbers
def _line_map(node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Dotted key -> 1-based line, from a composed YAML node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _line_map(v, key + ".", out)
    return out


def _where(src: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{src}:{line}" if line else src


# ------------------------------------------------------------------ typed coercion
def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if sections:  # an optional section, e.g. model.lora: present (even empty) = on
            return _build(sections[0], value or {}, where.split(": ")[0] if ": " in where else where, {}, key + ".")
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_tname(a) for a in args)
        raise ConfigError(f"{where}: {key}: expected {names}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and item is str:
            value = [value]  # a single path is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [_coerce(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, where, key): _coerce(v, vt, where, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp}")
    raise ConfigError(f"{where}: {key}: expected {_tname(tp)}, got {value!r}")


def _tname(tp) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _build(cls, data: dict, src: str, lines: dict[str, int], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(src, lines, prefix.rstrip('.'))}: {prefix.rstrip('.') or 'top level'}: "
                          f"expected a mapping, got {data!r}")
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in known:
            raise ConfigError(f"{_where(src, lines, key)}: unknown key {key!r} "
                              f"(known in {prefix.rstrip('.') or 'top level'}: {', '.join(sorted(known))})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, src, lines, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, _where(src, lines, key), key)
    return cls(**kwargs)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if cur.get(p) is None:
            cur[p] = {}
        cur = cur[p]
        if not isinstance(cur, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    cur[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override, type-check and validate. Raises ConfigError (never loads a model)."""
    path = shipped(path, RECIPES_DIR, ".yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (shipped recipes: {shipped_names(RECIPES_DIR, '.yaml')})")
    text = read_text(path, "config file")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    lines = _line_map(node) if node is not None else {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected key=value")
        key, val = ov.split("=", 1)
        key = key.strip()
        try:
            parsed = yaml.safe_load(val) if val.strip() else ""
        except yaml.YAMLError:
            parsed = val
        _set_dotted(raw, key, parsed)
        lines[key] = 0  # reported as "--set"
    src = str(path)
    # Overridden keys are reported against --set rather than a line of the file.
    lines = {k: v for k, v in lines.items() if v}
    try:
        cfg = _build(Config, raw, src, lines)
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    validate(cfg, src, lines)
    return cfg


def validate(cfg: Config, src: str = "<config>", lines: dict[str, int] | None = None) -> None:
    lines = lines or {}

    def err(key: str, msg: str):
        raise ConfigError(f"{_where(src, lines, key)}: {key}: {msg}")

    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v not in allowed:
            err(key, f"expected one of {', '.join(map(str, allowed))}, got {v!r}")
    m, t = cfg.model, cfg.train
    if bool(m.name_or_path) == bool(m.config):
        err("model.name_or_path", "set exactly one of model.name_or_path (pretrained) and model.config (random init)")
    if m.config and not m.tokenizer:
        err("model.tokenizer", "a random-init model (model.config) needs model.tokenizer")
    if not cfg.data.train:
        err("data.train", "no training data given")
    for k in cfg.data.columns:
        if k not in ("input", "target", "important"):
            err("data.columns", f"maps record fields input, target, important to column names; got {k!r}")
    for key, v, lo in [("train.micro_batch_size", t.micro_batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
                       ("data.max_length", cfg.data.max_length, 2), ("train.keep_last", t.keep_last, 1),
                       ("train.epochs", t.epochs, 1), ("train.log_every", t.log_every, 1),
                       ("cat.min_gap", cfg.cat.min_gap, 1), ("eval.batch_size", cfg.eval.batch_size, 1)]:
        if v < lo:
            err(key, f"must be >= {lo}, got {v}")
    for key, v in [("train.lr", t.lr), ("train.weight_decay", t.weight_decay), ("train.warmup_steps", t.warmup_steps),
                   ("train.save_every", t.save_every), ("train.grad_clip", t.grad_clip), ("cat.decay", cfg.cat.decay),
                   ("eval.every", cfg.eval.every), ("eval.attention_records", cfg.eval.attention_records)]:
        if v < 0:
            err(key, f"must be >= 0, got {v}")
    lora = cfg.model.lora
    if lora is not None and not m.name_or_path:
        err("model.lora", "adapters train on a pretrained base: set model.name_or_path (not model.config)")
    if lora is not None:
        if lora.r < 1:
            err("model.lora.r", f"must be >= 1, got {lora.r}")
        if lora.alpha <= 0:
            err("model.lora.alpha", f"must be > 0, got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            err("model.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
        if not lora.target_modules:
            err("model.lora.target_modules", "name at least one module (e.g. q_proj)")
    if cfg.cat.alpha <= 0:
        err("cat.alpha", f"must be > 0, got {cfg.cat.alpha}")
    if cfg.cat.enabled and m.attn_implementation != "cat_sdpa":
        err("model.attn_implementation", f"CAT needs 'cat_sdpa' (it computes the attention mass), got "
            f"{m.attn_implementation!r}")
    # The form here; the model's shape (layer and head counts) in preflight.check_cat_shape.
    for key, rule, spec in (("cat.layers", parse_layers, cfg.cat.layers), ("cat.heads", parse_heads, cfg.cat.heads)):
        try:
            rule(spec)
        except ValueError as e:
            err(key, str(e).split(": ", 1)[1])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
