"""Consolidate a ZeRO checkpoint into a Hugging Face model directory (safetensors + tokenizer).

    cat-ds export OUTPUT_DIR/checkpoints OUT_DIR        # the `latest` checkpoint
    cat-ds export OUTPUT_DIR/checkpoints/step_00000040 OUT_DIR

DeepSpeed's zero_to_fp32 merges the fp32 master shards of every rank on CPU; the model is
built on the meta device (no second full copy), the merged tensors are assigned, cast to the
training dtype recorded in the checkpoint's config, and written with `save_pretrained`.
Runs in one process, without torch.distributed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cat_ds.engine.checkpoint import resolve


def write_hf_files(module, tokenizer, directory: str | Path) -> None:
    """What export needs besides the weights, written into each checkpoint: the model config (training
    dtype), the tokenizer and, with LoRA, the adapter config (which names the frozen base)."""
    from cat_ds.engine.lora import is_peft, save_adapter_config

    module.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if is_peft(module):
        save_adapter_config(module, directory)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # an in-process training run leaves it set: it would re-shard the model
    root, tag = resolve(checkpoint_dir, tag)
    hf = root / tag / "hf"
    if (hf / "adapter_config.json").is_file():  # a LoRA run: merged model here, the adapter in adapter/
        from cat_ds.engine.lora import export_lora

        return export_lora(root, tag, hf, Path(out_dir))
    config = AutoConfig.from_pretrained(hf)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    return out
