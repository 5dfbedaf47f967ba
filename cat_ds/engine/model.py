"""Build the model and tokenizer the ZeRO-3 way.

`HfDeepSpeedConfig` must exist (and stay referenced) *before* the model is created: then
transformers builds it inside `deepspeed.zero.Init`, so `from_pretrained` streams weights
straight into shards and a model larger than one device still loads; a random-init model
from `model.config` is initialised by rank 0 on gathered parameters (same seed, same
weights, whatever the world size).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import torch

from cat_ds.choices import uses_bf16
from cat_ds.config import Config, ConfigError
from cat_ds.engine.ds_config import zero_stage


def model_dtype(cfg: Config, on_gpu: bool) -> torch.dtype:
    return torch.bfloat16 if uses_bf16(cfg.model.dtype, on_gpu) else torch.float32


def model_source(cfg: Config, convert: bool = False) -> str:
    """`model.name_or_path` as a directory or hub id (cat_ds.sources); a GGUF is converted
    (once, cached) only where convert=True: the main rank, before the others look."""
    from cat_ds.sources import SourceError, resolve

    try:
        return resolve(cfg.model.name_or_path, convert=convert)
    except SourceError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None


def load_model_config(cfg: Config):
    """The transformers config (no weights), e.g. to size ZeRO buckets before loading."""
    from transformers import AutoConfig

    from cat_ds.sources import load_error

    if cfg.model.config:
        path = Path(cfg.model.config)
        if not path.is_file():
            raise ConfigError(f"model.config: {path}: no such file")
        d = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in d:
            raise ConfigError(f"model.config: {path}: needs a 'model_type' (e.g. \"llama\")")
        return AutoConfig.for_model(**d)
    src = model_source(cfg)
    try:
        return AutoConfig.from_pretrained(src)
    except OSError as e:  # a hub id that is unreachable or unknown
        raise ConfigError(str(load_error(src, e))) from None


def load_tokenizer(cfg: Config):
    from cat_ds.data.tokenizers import load_tokenizer as _load

    return _load(cfg.model.tokenizer or model_source(cfg))


def _load_flash() -> bool:
    """Import flash-attn now, not at the first forward: a broken install is one warning line (rank 0)
    here, and "cat_sdpa" runs PyTorch's SDPA instead. True when flash-attn is in use."""
    from cat_ds.reattention.attention import load_flash

    flash = load_flash()
    if not callable(flash) and int(os.environ.get("RANK", "0")) == 0:
        print(f"[cat-ds] warning: {flash}: attention runs on PyTorch SDPA (slower, more memory at long "
              "sequences); see scripts/setup_venv.sh", file=sys.stderr, flush=True)
    return callable(flash)


def build_model(cfg: Config, ds_config: dict, *, on_gpu: bool, vocab_size: int | None = None):
    """Create the model (sharded at birth under ZeRO-3), in train mode. Returns (model, hf_ds_config);
    keep the second alive as long as the model (transformers reads it through a weak reference)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import cat_ds.reattention  # noqa: F401  registers the "cat_sdpa" attention implementation
    from cat_ds.reattention import check_gradient_checkpointing

    dtype = model_dtype(cfg, on_gpu)
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    torch.manual_seed(cfg.train.seed)  # random init is a function of the seed only
    if cfg.model.config:
        mcfg = load_model_config(cfg)
        if vocab_size is not None and mcfg.vocab_size < vocab_size:
            raise ConfigError(f"model.config: vocab_size {mcfg.vocab_size} < the tokenizer's {vocab_size} tokens")
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_source(cfg), dtype=dtype)
    model.set_attn_implementation(cfg.model.attn_implementation)
    if on_gpu and dtype != torch.float32 and cfg.model.attn_implementation == "cat_sdpa":  # flash: half only
        _load_flash()
    model.config.use_cache = False
    if cfg.model.lora is not None:
        from cat_ds.engine.lora import apply_lora

        model = apply_lora(model, cfg.model.lora, base_source=model_source(cfg))
    if cfg.model.gradient_checkpointing:
        # Non-reentrant: exact gradients for the side loss computed inside the block.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.cat.enabled:
        check_gradient_checkpointing(model)
    model.train()  # from_pretrained returns eval mode, where checkpointing is silently off
    return model, hf_ds


def gradient_checkpointing_active(model) -> bool:
    """True when some module will really checkpoint in the next forward (enabled and training)."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


def describe(model, *, zero_stage: int, world_size: int, lora) -> list[str]:
    """What rank 0 says about the model it built: sizes (under ZeRO-3 each rank holds ~1/world of
    every parameter from birth, zero.Init), checkpointing, LoRA's trainable share."""
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    n_here = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    lines = [f"model: {n_all:,} parameters; rank 0 holds {n_here:,} after loading (ZeRO stage {zero_stage}, world "
             f"{world_size}; activation checkpointing {'on' if gradient_checkpointing_active(model) else 'off'})"]
    if lora is not None:
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        lines.append(f"LoRA r={lora.r} on {', '.join(lora.target_modules)}: {n_train:,} trainable parameters "
                     f"({100 * n_train / n_all:.2f} %)")
    return lines


def takes_logits_mask(model) -> bool:
    """The model's forward takes a boolean logits_to_keep mask (transformers >= 5, most CausalLMs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def answer_lm_loss(engine, batch: dict, extra: dict, keep_logits: bool) -> torch.Tensor:
    """The LM loss (mean over answer tokens, or sum / extra["num_items_in_batch"]); `extra` may carry
    the CAT context ("cat").

    Why not `labels=`: the model would project every position onto the vocabulary (49k x 576
    on SmolLM2: a fifth of the step's FLOPs) while only the few answer positions carry a label.
    `logits_to_keep` (a boolean mask, transformers >= 5) keeps just those; transformers' own
    loss function then gets their shifted labels. Same loss, same gradients."""
    labels = batch["labels"]
    if not keep_logits:
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      **extra).loss
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
    cat = {"cat": extra["cat"]} if "cat" in extra else {}
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, **cat)
    items = {"num_items_in_batch": extra["num_items_in_batch"]} if "num_items_in_batch" in extra else {}
    return engine.module.loss_function(logits=out.logits, labels=None, vocab_size=out.logits.shape[-1],
                                       shift_labels=labels[:, 1:][keep[:, :-1]], **items)
