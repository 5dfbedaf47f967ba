import json
import re

import pytest

from cat_ds.data.records import load_records
from cat_ds.data.spans import find_occurrences
from cat_ds.data.stg import STG_PROMPT, generate_split, stg_label, write_stg


def _items(text):
    return dict((k, int(v)) for k, v in re.findall(r"([A-Z][a-z]+(?: [a-z]+)?): (\d+)", text))


def test_same_seed_gives_byte_identical_files(tmp_path):
    write_stg(tmp_path / "a", "stg", "S", seed=3)
    write_stg(tmp_path / "b", "stg", "S", seed=3)
    write_stg(tmp_path / "c", "stg", "S", seed=4)
    for f in ("train.jsonl", "test_iid.jsonl", "test_ood.jsonl", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a/train.jsonl").read_bytes() != (tmp_path / "c/train.jsonl").read_bytes()
    meta = json.loads((tmp_path / "a/meta.json").read_text())
    assert meta["sizes"] == {"train": 400, "test_iid": 400, "test_ood": 400} and meta["seed"] == 3


@pytest.mark.parametrize("size,n", [("S", 400), ("M", 800), ("L", 1600), ("37", 37)])
def test_stg_sizes(size, n):
    assert len(generate_split("stg", "train", n, 0)) == n


def test_stg_train_and_iid_follow_the_twin_rules_and_label():
    for split in ("train", "test_iid"):
        for r in generate_split("stg", split, 800, 5):
            assert r["input"].startswith(STG_PROMPT) and r["input"].endswith(" Answer: ")
            v = _items(r["input"])
            assert len(v) == 8 and all(1 <= v[k] <= 10 for k in ("Smoking", "Weight", "Exercise", "Certain gene", "Room size"))
            assert v["Yellow fingers"] == int(1.5 * v["Smoking"])
            assert v["Clothing size"] == v["Weight"]
            assert v["Hormones"] == int(0.5 * v["Exercise"])
            assert r["target"] == stg_label(v["Smoking"], v["Weight"], v["Exercise"])
            (key, vals), = r["important"][0].items()
            assert key == r["target"]
            assert vals == [f"Smoking: {v['Smoking']}", f"Weight: {v['Weight']}", f"Exercise: {v['Exercise']}"]
            for p in vals:
                assert find_occurrences(r["input"], p), p


def test_stg_ood_breaks_the_spurious_correlation():
    recs = generate_split("stg", "test_ood", 400, 0)
    broken = sum(_items(r["input"])["Yellow fingers"] != int(1.5 * _items(r["input"])["Smoking"]) for r in recs)
    assert broken > 300  # independent uniforms agree by chance about 1 time in 10
    for r in recs:
        v = _items(r["input"])
        assert all(1 <= x <= 10 for x in v.values())
        assert r["target"] == stg_label(v["Smoking"], v["Weight"], v["Exercise"])


def test_stg_label_bands():
    assert stg_label(1, 5, 2) == "Middle Risk"  # 1.2 + 3.5 - 2 == 2.7 exactly in IEEE double
    assert stg_label(1, 5, 2, "two") == "Low Risk"
    assert stg_label(4, 4, 2, "three") == "Middle Risk" and stg_label(4, 4, 2) == "Low Risk"
    assert stg_label(10, 10, 1) == "High Risk"
    labels = {r["target"] for r in generate_split("stg", "train", 800, 0, "three")}
    assert labels == {"High Risk", "Middle Risk", "Low Risk"}


def _stg_h_numbers(text):
    names = ["Industrial Emissions", "Vehicle Emissions", "Coal Dependency", "Agricultural Burning",
             "Urban Green Coverage", "Meteorological Dispersion", "Ice Cream Sales Index",
             "Allergy Complaints Level", "Renewable Stock Index", "Public Transport Subscriptions \\(k\\)",
             "Water Awareness Score"]
    return [float(re.search(n + r": (-?\d+(?:\.\d+)?)", text).group(1)) for n in names]


def test_stg_h_template_annotation_and_aqi(tmp_path):
    write_stg(tmp_path, "stg_h", 300, seed=2, test_size=300)
    train = load_records(tmp_path / "train.jsonl")
    ood = load_records(tmp_path / "test_ood.jsonl")
    assert len(train) == 300 and len(ood) == 300
    for r in train + ood:
        assert r.input.endswith("on a 0-100 scale? Answer: ")
        assert 0 <= int(r.target) <= 100 and r.target == str(int(r.target))
        (key, vals), = r.important
        assert key == f"Answer: {r.target}"
        assert len(vals) == 6 and vals[2].endswith("%") and vals[4].endswith("%")
        for p in vals:
            assert find_occurrences(r.input, p), p
        assert find_occurrences(r.text, key)
        f = _stg_h_numbers(r.input)
        raw = 0.3 * f[0] + 0.25 * f[1] + 0.2 * f[2] + 0.15 * f[3] - 0.2 * f[4] - 0.3 * f[5]
        # The label uses the unrounded factors; printed ones differ by <= 0.05 each.
        assert abs(round((min(max(raw, -20), 30) + 20) * 2) - int(r.target)) <= 1
    corr = lambda rs, i, j: _corr([_stg_h_numbers(r.input)[i] for r in rs], [_stg_h_numbers(r.input)[j] for r in rs])  # noqa: E731
    assert corr(train, 8, 0) > 0.9  # se3 = 1.1 f1 + noise in training
    assert abs(corr(ood, 8, 0)) < 0.2  # independent uniform in OOD
    se = [_stg_h_numbers(r.input)[6:] for r in ood]
    assert all(5 <= s[0] <= 9 and 2 <= s[1] <= 6 and -8 <= s[4] <= -4 for s in se)


def _corr(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5


def test_bad_sizes_are_clear():
    with pytest.raises(ValueError, match="train size: expected S, M, L"):
        write_stg("/tmp/never", "stg", "XL")
