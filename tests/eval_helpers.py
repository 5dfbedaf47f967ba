"""Tiny models/records for the evaluation tests (no downloads): a tiny Llama sized for the
conftest tokenizers, and a few plain-torch training steps so it answers for real."""

from __future__ import annotations

import torch

from cat_ds.data.stg import generate_split


def stg_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    return generate_split("stg", split, n, seed=seed)


def tiny_model(tokenizer, seed: int = 0, attn: str = "sdpa", layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.eval()


def train_tiny(model, tokenizer, records: list[dict], steps: int = 150, lr: float = 3e-3, batch: int = 16, seed: int = 0):
    """A few plain-torch steps on the answer tokens, so generation gives real, mixed answers
    (a random model's garbage would make equality checks trivially easy)."""
    from cat_ds.data.records import CatRecord
    from cat_ds.data.spans import tokenize_example

    exs = [tokenize_example(CatRecord(r["input"], str(r["target"]), None), tokenizer) for r in records]
    pad = tokenizer.pad_token_id
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(exs), (batch,), generator=g).tolist()
        width = max(len(exs[i].input_ids) for i in idx)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(exs[i].input_ids)
            ids[j, :n] = torch.tensor(exs[i].input_ids)
            labels[j, :n] = torch.tensor(exs[i].labels)
            mask[j, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()
