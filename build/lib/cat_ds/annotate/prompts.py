"""The annotation prompt: instructions, few-shot examples, and the record to annotate.

A template is plain text with three placeholders, replaced in one pass (so text inside a
record or an example is never re-scanned): `{examples}`, `{input}`, `{target}`. The whole
rendered template is sent as one user message, which every chat endpoint accepts.
Examples are CAT records (JSON Lines or a JSON array, loaded with the project's loader),
each with `important`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cat_ds.data.records import CatRecord, load_records

DEFAULT_TEMPLATE = """\
You annotate training examples for Causal Attention Tuning. Each example is a text made of \
an INPUT followed by a TARGET (the answer a model must learn to produce). Find its causal \
structure: which phrases that appear LATER in the text (keys: the answer, or intermediate \
results of a worked solution) are caused by which phrases that appear EARLIER (values: the \
facts the key is derived from).

Rules:
- Copy every phrase EXACTLY as it appears in the text: same characters, case, spacing and \
punctuation. Do not paraphrase, reformat numbers or fix typos.
- The text is the INPUT immediately followed by the TARGET, so a phrase may run across the \
boundary (e.g. "Answer: B").
- A key must appear in the text after each of its values. Keys usually come from the \
TARGET; values come from the INPUT or from earlier steps of the TARGET.
- Keep phrases short and specific: a number together with its name where there is one \
(e.g. "Weight: 4", "12 apples"), an equation, or the answer itself.
- List only values that really determine the key; leave out distractors that merely \
correlate with it or are irrelevant.
- Reply with JSON only, no prose: a list of objects, each mapping one key phrase to the \
list of its value phrases: [{"<key phrase>": ["<value phrase>", ...]}, ...]

{examples}

Now annotate this example.
INPUT:
{input}
TARGET:
{target}
ANSWER:
"""

# One example per kind of data the paper uses: classification (STG), math word problems
# (GSM8K-style worked solution, MAWPS/SVAMP-style numeric answer) and multiple choice (ARC).
# tests/test_annotate_unit.py checks every pair here passes the validation rule.
DEFAULT_EXAMPLES: list[dict] = [
    {
        "input": "Here is the statistical data for a person. Please predict the probability of "
        "cancer. Hormones: 2, Certain gene: 7, Smoking: 6, Room size: 3, Weight: 4, Yellow "
        "fingers: 9, Exercise: 5, Clothing size: 4 Answer: ",
        "target": "Low Risk",
        "important": [{"Low Risk": ["Smoking: 6", "Weight: 4", "Exercise: 5"]}],
    },
    {
        "input": "Question: Tom has 12 apples. He gives 5 apples to Anna and then buys 8 more. "
        "How many apples does Tom have now?\nAnswer: ",
        "target": "Tom gives away 5 apples, so he has 12 - 5 = 7. He buys 8 more, so he has "
        "7 + 8 = 15.\n#### 15",
        "important": [
            {"12 - 5 = 7": ["12 apples", "gives 5 apples"]},
            {"7 + 8 = 15": ["12 - 5 = 7", "buys 8 more"]},
            {"#### 15": ["7 + 8 = 15"]},
        ],
    },
    {
        "input": "Question: A baker made 24 cupcakes and sold 9 of them. How many cupcakes are "
        "left?\nAnswer: ",
        "target": 15,
        "important": [{"15": ["24 cupcakes", "sold 9"]}],
    },
    {
        "input": "Question: Which of these is a source of light energy?\n(A) a rock (B) the Sun "
        "(C) a chair (D) a puddle\nAnswer: ",
        "target": "B",
        "important": [{"Answer: B": ["source of light energy", "(B) the Sun"]}],
    },
]

_PLACEHOLDER = re.compile(r"\{(examples|input|target)\}")


def load_template(path: str | Path | None) -> str:
    if path is None:
        return DEFAULT_TEMPLATE
    text = Path(path).read_text(encoding="utf-8")
    missing = [p for p in ("{input}", "{target}") if p not in text]
    if missing:
        raise ValueError(f"{path}: prompt template lacks the placeholder(s) {', '.join(missing)}")
    return text


def load_examples(path: str | Path | None) -> list[CatRecord]:
    """Few-shot examples: the defaults, or CAT records from a file (each needs `important`)."""
    if path is None:
        from cat_ds.data.records import parse_record

        return [parse_record(e, f"default example {i}: ") for i, e in enumerate(DEFAULT_EXAMPLES)]
    records = load_records(path)
    for r in records:
        if not r.important:
            raise ValueError(f"{r.source}: important: an example needs a non-empty annotation")
    return records


def render_examples(examples: list[CatRecord]) -> str:
    blocks = []
    for i, ex in enumerate(examples, 1):
        answer = json.dumps([{k: v} for k, v in ex.important or []], ensure_ascii=False)
        blocks.append(f"Example {i}\nINPUT:\n{ex.input}\nTARGET:\n{ex.target}\nANSWER:\n{answer}")
    return "\n\n".join(blocks)


def render_prompt(template: str, examples_text: str, input_text: str, target: str) -> str:
    values = {"examples": examples_text, "input": input_text, "target": target}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
