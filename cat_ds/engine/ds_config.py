"""The DeepSpeed config, one owner: load (a path or a shipped name), fill "auto" from the run
config, list what stays "auto", read the ZeRO stage; and where a run's checkpoints live.

    raw = load_ds_config("zero3")                                      # preflight and the trainer
    fill_ds_config(raw, cfg, world_size=2)                             # preflight: batch arithmetic only
    ds_config = final_ds_config(raw, cfg, world_size=2, total_steps=100, on_gpu=True, hidden_size=576)

Torch-free: the launcher's preflight and `cat-ds plan` use it before any rank starts.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from cat_ds.choices import uses_bf16
from cat_ds.config import DS_CONFIGS_DIR, Config, ConfigError, read_text, shipped, shipped_names
from cat_ds.schedule import global_batch


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def load_ds_config(path: str | Path) -> dict:
    """A DeepSpeed JSON by path or shipped name (`zero3`); ConfigError names the file."""
    path = shipped(path, DS_CONFIGS_DIR, ".json")
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found (shipped: {shipped_names(DS_CONFIGS_DIR, '.json')})")
    try:
        return json.loads(read_text(path, "DeepSpeed config"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _fill_batch(ds_config: dict, cfg: Config, world_size: int, src: str) -> None:
    """The batch arithmetic: train_batch_size = micro_batch_size x grad_accum x world_size."""
    t = cfg.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": global_batch(t, world_size),
        "gradient_clipping": t.grad_clip,
    }
    for k, v in want.items():
        cur = ds_config.get(k, "auto")
        if cur == "auto":
            ds_config[k] = v
        elif cur != v:
            raise ConfigError(
                f"{src}: {k} = {cur} disagrees with the train config ({k} = {v}: micro_batch_size "
                f"{t.micro_batch_size} x grad_accum {t.grad_accum} x world_size {world_size} = "
                f"{want['train_batch_size']}); set it to \"auto\" or make them agree")


def fill_ds_config(ds_config: dict, cfg: Config, *, world_size: int, total_steps: int | None = None,
                   on_gpu: bool = False, hidden_size: int | None = None, src: str = "ds_config") -> dict:
    """Replace "auto" values from the train config; check explicit values agree with it.

    Batch arithmetic: train_batch_size = micro_batch_size x grad_accum x world_size. Precision:
    bf16 on GPU, fp32 on CPU (DeepSpeed has no fp16 on CPU) unless model.dtype says otherwise.
    `total_steps`/`hidden_size` may be None for an early check; call again once they are known.
    """
    ds_config = copy.deepcopy(ds_config)
    t = cfg.train
    _fill_batch(ds_config, cfg, world_size, src)
    bf16 = uses_bf16(cfg.model.dtype, on_gpu)
    for k in ("bf16", "fp16"):
        sec = ds_config.get(k)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = bf16 if k == "bf16" else False
    if isinstance(ds_config.get("fp16"), dict) and ds_config["fp16"].get("enabled") is True and not on_gpu:
        raise ConfigError(f"{src}: fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    opt = ds_config.get("optimizer", {}).get("params", {})
    for k, v in (("lr", t.lr), ("weight_decay", t.weight_decay)):
        if opt.get(k) == "auto":
            opt[k] = v
    _fill_scheduler(ds_config.get("scheduler", {}), t.lr, t.warmup_steps, total_steps)
    zero = ds_config.get("zero_optimization", {})
    if hidden_size:  # the HF Trainer's heuristics for the size-dependent ZeRO-3 knobs
        for k, v in (("reduce_bucket_size", hidden_size * hidden_size),
                     ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                     ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(k) == "auto":
                zero[k] = v
    return ds_config


# DeepSpeed's Warmup* schedulers warm up over at least 2 steps and set the lr to its minimum when
# built, and the engine steps them after each optimizer step: with no warm-up asked for, step 1
# and 2 would run at lr 0. So with train.warmup_steps 0 the scheduler starts past its warm-up
# (`last_batch_iteration`, which also skips that reset: step 1 runs at the optimizer's lr, the
# peak) and its end moves by as much, so that step k of T runs at:
#   WarmupLR: peak;  WarmupDecayLR: peak x (T - k + 1) / T;  WarmupCosineLR: cosine at (k - 1) / (T - 1).
# With a warm-up (W > 0, W >= 2) DeepSpeed's own counting stands: steps 1-2 at the minimum, step k at
# (k - 2) / W of the way up, the peak at step W + 2 (kept: the README's figures were measured with it).
_NO_WARMUP_START = {"WarmupLR": 2, "WarmupDecayLR": 2, "WarmupCosineLR": 1}


def _fill_scheduler(scheduler: dict, lr: float, warmup_steps: int, total_steps: int | None) -> None:
    params = scheduler.get("params", {})
    start = _NO_WARMUP_START.get(scheduler.get("type")) if warmup_steps == 0 else None
    if start is not None and "last_batch_iteration" not in params:
        params["last_batch_iteration"] = start
    shift = start or 0
    for k, v in (("warmup_max_lr", lr), ("warmup_min_lr", 0.0), ("warmup_num_steps", max(1, warmup_steps)),
                 ("total_num_steps", None if total_steps is None else total_steps + shift)):
        if params.get(k) == "auto" and v is not None:
            params[k] = v


def unresolved_auto(ds_config: dict, prefix: str = "") -> list[str]:
    """Dotted keys still "auto" (a bug or an unknown auto key: DeepSpeed would choke on them)."""
    out = []
    for k, v in ds_config.items():
        if isinstance(v, dict):
            out += unresolved_auto(v, f"{prefix}{k}.")
        elif v == "auto":
            out.append(f"{prefix}{k}")
    return out


def final_ds_config(raw: dict, cfg: Config, *, world_size: int, total_steps: int, on_gpu: bool,
                    hidden_size: int | None, src: str) -> dict:
    """The config handed to `deepspeed.initialize`: filled with the real step count and model width,
    nothing left "auto" (ConfigError otherwise)."""
    ds_config = fill_ds_config(raw, cfg, world_size=world_size, total_steps=total_steps, on_gpu=on_gpu,
                               hidden_size=hidden_size, src=src)
    left = unresolved_auto(ds_config)
    if left:
        raise ConfigError(f"{src}: cat-ds cannot fill these \"auto\" values: {', '.join(left)}")
    return ds_config
