"""The floor a training step is measured against (bench/step_time.py): the same model, attention
function and Re-Attention loss in one plain PyTorch process, no DeepSpeed. It is a timing
reference, not a trainer: no data order, schedule, clipping, checkpoints or logging. It lives
here because the engine package owns every optimizer."""
from __future__ import annotations

import torch

from cat_ds.config import Config
from cat_ds.engine.model import model_dtype, model_source
from cat_ds.reattention import CatContext, reattention_loss, register


def plain_stepper(cfg: Config, device: torch.device):
    """Returns step(batch): forward (`labels=`), backward and a fused AdamW update."""
    from transformers import AutoModelForCausalLM

    register()
    dtype = model_dtype(cfg, on_gpu=device.type == "cuda")
    model = AutoModelForCausalLM.from_pretrained(model_source(cfg), dtype=dtype).to(device)
    model.set_attn_implementation("cat_sdpa")
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=True)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads

    def step(mb: dict) -> None:
        mb = {k: v.to(device) for k, v in mb.items()}
        kw = {}
        if cfg.cat.enabled:
            kw["cat"] = CatContext.from_batch(mb, layers=list(range(n_layers)), num_heads=n_heads)
        loss = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"], **kw).loss
        if cfg.cat.enabled:
            loss = loss + reattention_loss(kw["cat"], alpha=cfg.cat.alpha, loss_type=cfg.cat.loss_type).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
