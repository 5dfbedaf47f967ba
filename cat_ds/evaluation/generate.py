"""Batched greedy generation for evaluation.

Two traps this module exists to avoid (both measured on this project's machines):
- The prompt is tokenised exactly like the training prefix before the first answer token.
  Inputs end in "Answer: "; in training that space is folded into the first answer token
  (" High"), so the prompt must end in ":" and the model generates " High Risk" itself.
  Tokenising "Answer: " as is ends the prompt in a lone " " token never seen before an
  answer (a tiny STG model drops from 80% to 17%). See `prompt_ids`.
- Under ZeRO-3, parameter gathers are collective: every rank must run the same number of
  forward passes. `generate(synced_gpus=True)` keeps finished ranks stepping, and the caller
  (see `run.py`) gives every rank the same number of batches.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


PROMPT_MODES = ("training", "raw")


def prompt_ids(tokenizer, input_text: str, target: str | None = None, mode: str = "training") -> list[int]:
    """Token ids of the generation prompt.

    `training` (default): exactly the training ids before `answer_start`, computed by the same
    `tokenize_example` call training uses. The target only decides which side of the
    input/answer boundary trailing whitespace falls on; that differs by tokenizer *and* by
    answer: byte-level BPE folds "Answer: " + "High" into " High" (prompt ends in ":"), while
    Llama-3/Qwen regexes split " " from digits (prompt ends in " " before "57"). No answer
    token is ever part of the prompt. Without a target, trailing whitespace is stripped.
    `raw`: the research code's way, the input tokenised as is (documented difference)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode: expected one of {PROMPT_MODES}, got {mode!r}")
    if mode == "raw":
        return list(tokenizer(input_text, add_special_tokens=True)["input_ids"])
    if target is None:
        return list(tokenizer(input_text.rstrip(), add_special_tokens=True)["input_ids"])
    from cat_ds.data.records import CatRecord
    from cat_ds.data.spans import tokenize_example

    ex = tokenize_example(CatRecord(input_text, str(target), None), tokenizer)
    return ex.input_ids[: ex.answer_start]


def prepare_prompts(tokenizer, records: Sequence[tuple[str, str]], mode: str = "training",
                    margin: int = 4) -> tuple[list[list[int]], int]:
    """(prompt ids per record, default max_new_tokens), from ONE training tokenisation per record:
    the prompt is the training prefix (see `prompt_ids`; `raw` tokenises the input as is), and the
    budget is the longest answer as training sees it (EOS included) plus a small margin: anything
    longer cannot be scored correct by an exact scorer, so a bigger budget only costs time."""
    from cat_ds.data.records import CatRecord
    from cat_ds.data.spans import tokenize_example

    prompts, longest = [], 1
    for inp, tgt in records:
        ex = tokenize_example(CatRecord(inp, str(tgt), None), tokenizer)
        longest = max(longest, len(ex.input_ids) - ex.answer_start)
        prompts.append(ex.input_ids[: ex.answer_start] if mode == "training" else prompt_ids(tokenizer, inp, tgt, mode))
    return prompts, longest + margin


def default_max_new_tokens(tokenizer, records: Sequence[tuple[str, str]], margin: int = 4) -> int:
    """The default generation budget of `prepare_prompts`."""
    return prepare_prompts(tokenizer, records, margin=margin)[1]


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an EOS token; generation needs one to pad and stop")


_NEWLINE_CACHE: dict[int, torch.Tensor] = {}


def _newline_token_mask(tokenizer) -> torch.Tensor:
    """Bool (vocab,): token decodes to text whose first line has content and that contains a
    newline, i.e. generating it ends a non-empty first line. Computed once per tokenizer."""
    key = id(tokenizer)
    if key not in _NEWLINE_CACHE:
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        _NEWLINE_CACHE[key] = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
        _NEWLINE_CACHE[(key, "ws")] = torch.tensor([t.strip() == "" for t in texts], dtype=torch.bool)
    return _NEWLINE_CACHE[key]


class _StopAtNewline(StoppingCriteria):
    """Row is done once it generated a newline after some non-whitespace text."""

    def __init__(self, tokenizer, prompt_len: int):
        self.nl = _newline_token_mask(tokenizer)
        self.ws = _NEWLINE_CACHE[(id(tokenizer), "ws")]
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        gen = input_ids[:, self.prompt_len:].cpu()
        gen = gen.clamp(max=len(self.nl) - 1)  # ids beyond the tokenizer (padded embeddings)
        last_nl = self.nl[gen[:, -1]]
        # Content before the newline: any earlier non-whitespace token, or the last token itself
        # (a token like "Risk\n" both ends and has content). Good enough for a stop rule; the
        # exact cut happens on the decoded text in `generate_batch`.
        had_content = (~self.ws[gen]).any(dim=1)
        return (last_nl & had_content).to(input_ids.device)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_at_newline: bool = False,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of the prompt id lists (left padded), decoded without special
    tokens, cut at the first newline if asked, stripped."""
    pad = _pad_id(tokenizer)
    ids = [list(p) for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        attention_mask[i, width - len(x):] = 1
    device = model.device
    stopping = StoppingCriteriaList([_StopAtNewline(tokenizer, width)]) if stop_at_newline else None
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=stopping,
        synced_gpus=synced_gpus,
    )
    texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
    return [postprocess(t, stop_at_newline) for t in texts]


def postprocess(continuation: str, stop_at_newline: bool) -> str:
    """Strip; with `stop_at_newline`, keep only the first non-empty line."""
    text = continuation.strip()
    if stop_at_newline:
        text = text.split("\n", 1)[0].strip()
    return text
