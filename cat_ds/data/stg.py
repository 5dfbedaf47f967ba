"""Spurious Token Game (STG) and STG_H generators, exactly as docs/METHOD.md section 4.

Deterministic from a seed: each split draws from its own `random.Random` seeded by a
string (Python hashes str seeds with SHA-512, independent of PYTHONHASHSEED), so the same
seed gives byte-identical files and changing one split's size leaves the others unchanged.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cat_ds.choices import STG_TWINS, stg_twin_value
from cat_ds.data.records import write_jsonl
from cat_ds.data.tables import is_hub_split

GENERATOR_VERSION = 1

# ---------------------------------------------------------------- STG ("cancer risk")
STG_PROMPT = "Here is the statistical data for a person. Please predict the probability of cancer. "
STG_SIZES = {"S": 400, "M": 800, "L": 1600}
# The eight variables of an STG record (causal: the first three; the twins; two distractors).
STG_NAMES = ["Smoking", "Weight", "Exercise", "Yellow fingers", "Clothing size", "Hormones", "Certain gene",
             "Room size"]
STG_TEST_SIZE = 400
# Label bands. "paper": the research code's degenerate middle band 2.7 <= v <= 2.7 (about
# 1 record in 800); "two": High/Low only; "three": a real band 2.7 <= v <= 7.2.
STG_CLASSES = ("paper", "two", "three")


def stg_label(smoking: int, weight: int, exercise: int, classes: str = "paper") -> str:
    v = 1.2 * smoking + 0.7 * weight - exercise  # IEEE double, in this order
    if v > 7.2:
        return "High Risk"
    if classes == "paper" and v == 2.7:
        return "Middle Risk"
    if classes == "three" and v >= 2.7:
        return "Middle Risk"
    return "Low Risk"


def stg_record(rng: random.Random, ood: bool, classes: str = "paper") -> dict:
    u = lambda: rng.randint(1, 10)  # noqa: E731
    smoking, weight, exercise = u(), u(), u()
    if ood:  # the twins carry no information
        fingers, clothing, hormones = u(), u(), u()
    else:
        causes = {"Smoking": smoking, "Weight": weight, "Exercise": exercise}
        fingers, clothing, hormones = (stg_twin_value(causes[c], f) for c, f in STG_TWINS.values())
    gene, room = u(), u()
    causal = [f"Smoking: {smoking}", f"Weight: {weight}", f"Exercise: {exercise}"]
    items = causal + [
        f"Yellow fingers: {fingers}",
        f"Clothing size: {clothing}",
        f"Hormones: {hormones}",
        f"Certain gene: {gene}",
        f"Room size: {room}",
    ]
    rng.shuffle(items)
    label = stg_label(smoking, weight, exercise, classes)
    return {
        "input": STG_PROMPT + ", ".join(items) + " Answer: ",
        "target": label,
        "important": [{label: causal}],
    }


# ---------------------------------------------------------------- STG_H (air quality)
STG_H_TRAIN_SIZE = 3000
STG_H_TEST_SIZE = 1000


def stg_h_record(rng: random.Random, ood: bool) -> dict:
    U, N = rng.uniform, rng.gauss
    f1 = U(30, 70) + N(0, 2)
    f2 = U(20, 60) + N(0, 2)
    f3 = U(10, 50) + N(0, 1.5)
    f4 = U(10, 30) + N(0, 1)
    f5 = U(40, 80) + N(0, 3)
    f6 = U(50, 90) + N(0, 3)
    raw = 0.3 * f1 + 0.25 * f2 + 0.2 * f3 + 0.15 * f4 - 0.2 * f5 - 0.3 * f6
    clipped = min(max(raw, -20.0), 30.0)
    aqi = round((clipped + 20) / 50 * 100)  # Python round: half to even
    if ood:
        # The research code draws OOD spurious factors on different scales than training;
        # reproduced as is (docs/METHOD.md section 4).
        se1, se2, se3, se4, se5 = U(5, 9), U(2, 6), U(3, 7), U(3, 9), U(-8, -4)
    else:
        se1 = 0.4 * f6 + N(0, 2)
        se2 = 0.2 * f4 + N(0, 3)
        se3 = 1.1 * f1 + N(0, 1.5)
        se4 = 0.15 * f2 + N(0, 2)
        se5 = -0.1 * f5 + N(0, 1)
    ir1 = rng.randint(1, 100)
    ir2 = U(80, 120) + N(0, 3)
    ir3 = rng.randint(10, 50)
    causal = [f"{f1:.1f}", f"{f2:.1f}", f"{f3:.1f}%", f"{f4:.1f}", f"{f5:.1f}%", f"{f6:.1f}"]
    text = (
        f"Industrial Emissions: {causal[0]}; Vehicle Emissions: {causal[1]}; "
        f"Coal Dependency: {causal[2]}; Agricultural Burning: {causal[3]}; "
        f"Urban Green Coverage: {causal[4]}; Meteorological Dispersion: {causal[5]}. "
        f"Ice Cream Sales Index: {se1:.1f}; Allergy Complaints Level: {se2:.1f}; "
        f"Renewable Stock Index: {se3:.0f}; Public Transport Subscriptions (k): {se4:.1f}; "
        f"Water Awareness Score: {se5:.1f}. City Anniversary: {ir1}th; "
        f"Average Internet Speed: {ir2:.1f}Mbps; Number of Libraries: {ir3}. "
        "Given these diverse conditions, what is the projected Air Quality Index (AQI) on a "
        "0-100 scale?"
    )
    return {"input": text + " Answer: ", "target": aqi, "important": [{f"Answer: {aqi}": causal}]}


# ---------------------------------------------------------------- splits and files
@dataclass
class StgSizes:
    train: int
    test_iid: int
    test_ood: int


def resolve_sizes(task: str, train_size: str | int | None, test_size: int | None = None) -> StgSizes:
    if task not in ("stg", "stg_h"):
        raise ValueError(f"task: expected 'stg' or 'stg_h', got {task!r}")
    default_train = STG_SIZES["M"] if task == "stg" else STG_H_TRAIN_SIZE
    default_test = STG_TEST_SIZE if task == "stg" else STG_H_TEST_SIZE
    if train_size is None:
        n = default_train
    elif str(train_size).upper() in STG_SIZES:
        n = STG_SIZES[str(train_size).upper()]
    else:
        try:
            n = int(train_size)
        except ValueError:
            raise ValueError(f"train size: expected S, M, L or a positive integer, got {train_size!r}") from None
        if n <= 0:
            raise ValueError(f"train size: expected a positive integer, got {n}")
    t = default_test if test_size is None else test_size
    return StgSizes(n, t, t)


def generate_split(task: str, split: str, n: int, seed: int, classes: str = "paper") -> list[dict]:
    if classes not in STG_CLASSES:
        raise ValueError(f"classes: expected one of {STG_CLASSES}, got {classes!r}")
    rng = random.Random(f"cat-ds/{task}/{split}/{seed}")
    ood = split == "test_ood"
    if task == "stg":
        return [stg_record(rng, ood, classes) for _ in range(n)]
    return [stg_h_record(rng, ood) for _ in range(n)]


def write_stg(
    out_dir: str | Path,
    task: str = "stg",
    train_size: str | int | None = None,
    seed: int = 0,
    test_size: int | None = None,
    classes: str = "paper",
) -> dict:
    """Write train.jsonl, test_iid.jsonl, test_ood.jsonl and meta.json; return the metadata."""
    sizes = resolve_sizes(task, train_size, test_size)
    if task == "stg_h" and classes != "paper":
        raise ValueError("classes: only STG has label bands; STG_H predicts an integer AQI")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", sizes.train), ("test_iid", sizes.test_iid), ("test_ood", sizes.test_ood)):
        write_jsonl(generate_split(task, split, n, seed, classes), out / f"{split}.jsonl")
    meta = {
        "task": task,
        "sizes": {"train": sizes.train, "test_iid": sizes.test_iid, "test_ood": sizes.test_ood},
        "seed": seed,
        "classes": classes if task == "stg" else None,
        "version": GENERATOR_VERSION,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


STG_DIR_SIZES = {"stg_s": ("stg", "S"), "stg_m": ("stg", "M"), "stg_l": ("stg", "L"), "stg_h": ("stg_h", None)}


def generation_command(path: Path) -> str | None:
    """The `cat-ds data stg` command that writes `path`, if it lies in a data/stg_* directory."""
    spec = STG_DIR_SIZES.get(Path(path).parent.name)
    if spec is None:
        return None
    task, size = spec
    return f"cat-ds data stg --task {task}" + (f" --train-size {size}" if size else "") + f" --out {Path(path).parent}"


def ensure_stg(paths: list[str], generate: bool) -> None:
    """A missing file inside `data/stg_{s,m,l,h}/` is generated with the default seed (0),
    exactly what `cat-ds data stg --task ... --train-size ... --seed 0 --out DIR` writes;
    other missing files raise with that command in the message. Call on the main rank only."""
    for p in paths:
        path = Path(p)
        if path.exists() or any(ch in p for ch in "*?[") or is_hub_split(p):
            continue
        cmd = generation_command(path)
        if cmd is None:
            raise FileNotFoundError(f"{p}: no such file")
        task, size = STG_DIR_SIZES[path.parent.name]
        if not generate:
            raise FileNotFoundError(f"{p}: no such file; generate it with: {cmd}")
        print(f"[cat-ds] {p} missing: generating it ({cmd})", flush=True)
        write_stg(path.parent, task=task, train_size=size, seed=0)
