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


def numbers_record(rng: random.Random, names: list[str] = GENERIC_NAMES) -> CatRecord:
    k = rng.randint(4, 8)
    chosen = rng.sample(names, k)
    vals = {n: rng.randint(1, 10) for n in chosen}
    x, y = rng.sample(chosen, 2)
    kind = rng.randrange(5)
    if kind == 0:
        q, a = f"What is {x}?", str(vals[x])
    elif kind == 1:
        q, a = f"Is {x} greater than {y}?", "Yes" if vals[x] > vals[y] else "No"
    elif kind == 2:
        t = rng.randint(1, 9)
        q, a = f"Is {x} above {t}?", "Yes" if vals[x] > t else "No"
    elif kind == 3:
        t = rng.randint(4, 16)
        q, a = f"Is {x} plus {y} above {t}?", "Yes" if vals[x] + vals[y] > t else "No"
    else:
        q, a = f"What is {x} plus {y}?", str(vals[x] + vals[y])
    items = ", ".join(f"{n}: {vals[n]}" for n in chosen)
    return CatRecord(f"Here is some data. {items}. Question: {q} Answer: ", a, None)


def numbers_corpus(n: int, seed: int, names: list[str] = GENERIC_NAMES) -> list[CatRecord]:
    rng = random.Random(f"cat-ds/numbers/{seed}")
    return [numbers_record(rng, names) for _ in range(n)]


def write_numbers(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(numbers_corpus(n, seed), path)
    return path
