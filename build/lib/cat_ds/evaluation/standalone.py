"""`cat-ds eval`: the training-time evaluation, standalone, on a Hugging Face model dir."""

from __future__ import annotations

import os
from pathlib import Path

from cat_ds.evaluation.run import EvalResult, run_eval, write_predictions


def evaluate_model_dir(model_dir: str | os.PathLike, data, *, scorer: str = "exact", batch_size: int = 8,
                       max_new_tokens: int | None = None, stop_at_newline: bool | None = None,
                       prompt_mode: str = "training", predictions_out: str | os.PathLike | None = None,
                       tokenizer_dir: str | os.PathLike | None = None, chat_template: bool = False) -> EvalResult:
    import torch
    from transformers import AutoModelForCausalLM

    from cat_ds.data.records import load_records
    from cat_ds.data.tokenizers import load_tokenizer

    records = load_records(data)  # validates everything first; errors name file:line:field
    tok_dir = Path(tokenizer_dir or model_dir)
    tokenizer = load_tokenizer(tok_dir)
    if chat_template:  # a model trained with data.chat_template is asked the same way
        from cat_ds.data.chat import render

        records = render(records, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").to(device)
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager", "flash_attention_2"):
        # A model exported from a CAT run may carry "cat_sdpa"; generation needs only the output.
        model.set_attn_implementation("sdpa")
    result = run_eval(model, tokenizer, records, scorer=scorer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      stop_at_newline=stop_at_newline, prompt_mode=prompt_mode, rank=0, world_size=1)
    if predictions_out:
        write_predictions(result, predictions_out)
    return result
