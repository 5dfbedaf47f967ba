"""`data.chat_template: true`: each record rendered with the model's own chat template.

The input becomes the user turn and the target the assistant turn, exactly as the model saw
conversations in its instruction tuning:

    <|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n{target}<eos>

Only `input` changes (it becomes the whole prompt, generation header included); the target
stays, and since the mask is built from character offsets in the rendered text
(`cat_ds.data.spans`), every causal value lands on the same tokens as without the template
(tested with the real SmolLM2 tokenizer). One rewrite: a phrase that runs across the
input/target boundary (STG_H's key "Answer: 63", whose "Answer: " ends the input) would no
longer be found, so it becomes the rendered text it now spans, "Answer: <|im_end|>\n
<|im_start|>assistant\n63": the same rows stay supervised, plus the template's header rows. The EOS the tokenizer step appends after the
target is the model's end of turn (`<|im_end|>` for SmolLM2). Training, evaluation prompts and
the attention probe all render through `render`, so they agree.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from cat_ds.data.records import CatRecord


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template to render with."""


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def render_prompt(tokenizer, user: str) -> str:
    """The templated prompt for one user turn, up to and including the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"data.chat_template is on but the tokenizer ({tokenizer.name_or_path}) has no chat "
                                "template; turn it off or use the model's instruct tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    # Templates that write the BOS text themselves (Llama-3) would get a second one from the tokenizer.
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token) and _adds_bos(tokenizer):
        text = text[len(tokenizer.bos_token):]
    return text


def _across(phrase: str, before: str, between: str, after: str) -> str:
    """`phrase` as found in before + between + after, if it ran across the end of `before`."""
    for cut in range(1, len(phrase)):
        if before.endswith(phrase[:cut]) and after.startswith(phrase[cut:]):
            return phrase[:cut] + between + phrase[cut:]
    return phrase


def render(records: Iterable[CatRecord], tokenizer) -> list[CatRecord]:
    out = []
    for r in records:
        prompt = render_prompt(tokenizer, r.input)
        header = prompt[prompt.rfind(r.input) + len(r.input):]  # e.g. "<|im_end|>\n<|im_start|>assistant\n"
        important = r.important and [(_across(k, r.input, header, r.target),
                                      [_across(v, r.input, header, r.target) for v in vs]) for k, vs in r.important]
        out.append(replace(r, input=prompt, important=important or r.important))
    return out
