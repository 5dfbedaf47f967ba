"""LoRA adapters (peft) for the engine: `model.lora` in the config.

peft owns the adapters: `get_peft_model` wraps the target projections, the base weights are frozen
and only the adapter matrices train (and reach the optimizer). CAT's attention function is the
same: it sees the adapted q/k/v projections, so the Re-Attention loss's gradient flows into the
adapters (tested against the dense reference). Under ZeRO-3 the frozen base is loaded sharded
(HfDeepSpeedConfig) and the new adapter parameters are partitioned by deepspeed.initialize.

Checkpoints hold the trainable parameters and their optimizer state only
(`exclude_frozen_parameters`); a resumed run rebuilds the frozen base from the model source.
Export writes the merged model (a plain Hugging Face model) and, in `adapter/`, the peft adapter
that `PeftModel.from_pretrained(base, dir)` loads; their logits agree (tested).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cat_ds.config import ConfigError, LoraSettings

ADAPTER_DIR = "adapter"  # inside an export directory


def linear_names(model) -> list[str]:
    """The last name component of every linear module: what `target_modules` may name."""
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name})


def apply_lora(model, lora: LoraSettings, base_source: str | None = None):
    """Wrap `model` with LoRA adapters on `lora.target_modules`; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    names = linear_names(model)
    unknown = [t for t in lora.target_modules if t not in names]
    if unknown:
        raise ConfigError(f"model.lora.target_modules: {', '.join(unknown)} match no linear module of this model; "
                          f"its linear modules are: {', '.join(names)}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none",
                        base_model_name_or_path=base_source)
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_adapter_config(model, out_dir: Path) -> None:
    """adapter_config.json next to a checkpoint's config: what export needs to rebuild the adapters."""
    model.peft_config["default"].save_pretrained(str(out_dir))


def export_lora(root: Path, tag: str, hf: Path, out: Path) -> Path:
    """Merged model in `out`, peft adapter in `out/adapter`, from a LoRA checkpoint (trainable
    parameters only) and the base model named in its adapter_config.json."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = LoraConfig.from_pretrained(str(hf))
    mcfg = AutoConfig.from_pretrained(hf)
    dtype = mcfg.dtype if isinstance(mcfg.dtype, torch.dtype) else getattr(torch, str(mcfg.dtype or "float32"))
    try:
        base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=dtype)
    except Exception as e:
        raise FileNotFoundError(f"{hf / 'adapter_config.json'}: cannot load the base model "
                                f"{config.base_model_name_or_path!r} the adapters were trained on ({type(e).__name__})") from None
    model = get_peft_model(base, config)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(state):
        raise RuntimeError(f"checkpoint {root / tag} does not match the adapters: missing {sorted(trainable - set(state))}, "
                           f"unexpected {unexpected}")
    tok = AutoTokenizer.from_pretrained(hf)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / ADAPTER_DIR), safe_serialization=True)
    tok.save_pretrained(out / ADAPTER_DIR)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
