"""Generic synthetic "numbers" text for a short pre-training stage (the demo's stand-in for
what a pretrained LLM already knows): 4-8 independent "Name: v" items (v uniform 1..10) and a
question about some of them (lookup, comparison, threshold, sum threshold, sum).

It deliberately shares nothing with STG's structure: no STG names, no twins, no label rule.
Records carry no `important` field (LM loss on the answer only)."""

from __future__ import annotations

import random
from pathlib import Path

from cat_ds.data.records import CatRecord, write_jsonl

GENERIC_NAMES = [
    "Age", "Height", "Income", "Sleep", "Stress", "Coffee", "Sugar", "Salt", "Rain", "Noise", "Speed",
    "Distance", "Pressure", "Humidity", "Traffic", "Price", "Energy", "Water", "Light", "Heat", "Wind",
    "Blood pressure", "Shoe size", "Screen time", "Daily steps", "Heart rate", "Body fat", "Hair length",
]


QUESTION_KINDS = ("lookup", "compare", "threshold", "sum_threshold", "sum")


def numbers_record(rng: random.Random, names: list[str] = GENERIC_NAMES,
                   kind_weights: tuple[float, ...] | None = None, questions: int = 1,
                   annotate: bool = False) -> CatRecord:
    """One record; the question kind is uniform over QUESTION_KINDS unless `kind_weights` says otherwise.

    `questions` > 1 asks further questions about the same items inside the target ("8. Question:
    ... Answer: Yes"): the answer-only loss supervises one token per question, and a tiny model
    given one supervised token per record does not learn to look a value up by its name.

    `annotate` adds a causal annotation, "Answer: <a>" <- ["<X>: <v>", ...], the items the
    question names, so that pre-training can also supervise where the answer looks (one question
    per record only: two questions with the same answer would merge their items under one key)."""
    if annotate and questions != 1:
        raise ValueError(f"numbers_record: annotate needs questions=1, got {questions}")
    k = rng.randint(4, 8)
    chosen = rng.sample(names, k)
    vals = {n: rng.randint(1, 10) for n in chosen}
    qa = [_question(rng, chosen, vals, kind_weights) for _ in range(questions)]
    items = ", ".join(f"{n}: {vals[n]}" for n in chosen)
    target = qa[0][1] + "".join(f". Question: {q} Answer: {a}" for q, a, _ in qa[1:])
    important = [(f"Answer: {qa[0][1]}", [f"{n}: {vals[n]}" for n in qa[0][2]])] if annotate else None
    return CatRecord(f"Here is some data. {items}. Question: {qa[0][0]} Answer: ", target, important)


def _question(rng: random.Random, chosen: list[str], vals: dict[str, int],
              kind_weights: tuple[float, ...] | None) -> tuple[str, str, list[str]]:
    """(question, answer, the names the answer depends on)."""
    x, y = rng.sample(chosen, 2)
    kind = rng.randrange(5) if kind_weights is None else rng.choices(range(5), kind_weights)[0]
    if kind == 0:
        return f"What is {x}?", str(vals[x]), [x]
    if kind == 1:
        return f"Is {x} greater than {y}?", "Yes" if vals[x] > vals[y] else "No", [x, y]
    if kind == 2:
        t = rng.randint(1, 9)
        return f"Is {x} above {t}?", "Yes" if vals[x] > t else "No", [x]
    if kind == 3:
        t = rng.randint(4, 16)
        return f"Is {x} plus {y} above {t}?", "Yes" if vals[x] + vals[y] > t else "No", [x, y]
    return f"What is {x} plus {y}?", str(vals[x] + vals[y]), [x, y]


def numbers_corpus(n: int, seed: int, names: list[str] = GENERIC_NAMES,
                   kind_weights: tuple[float, ...] | None = None, questions: int = 1,
                   annotate: bool = False) -> list[CatRecord]:
    rng = random.Random(f"cat-ds/numbers/{seed}")
    return [numbers_record(rng, names, kind_weights, questions, annotate) for _ in range(n)]


def write_numbers(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(numbers_corpus(n, seed), path)
    return path
