"""bench/stg_recipe.py: the generic pre-training text and a tiny end-to-end run."""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
from conftest import load_bench_script


@pytest.fixture(scope="module")
def recipe():
    return load_bench_script("stg_recipe")


def test_generic_pretraining_has_no_stg_names_and_independent_values(recipe):
    records = recipe.numbers_corpus(600, 0, recipe.GENERIC_NAMES, "mix")
    for r in records:
        assert not any(n in r.input for n in recipe.STG_NAMES), r.input
        values = [int(v) for v in re.findall(r": (\d+)[,.]? ", r.input)]
        assert values and all(1 <= v <= 10 for v in values), r.input
        assert r.important is None
    rule_answers = Counter(r.target for r in records if r.input.startswith("Task "))
    assert set(rule_answers) == {"Yes", "No"}
    assert min(rule_answers.values()) > 0.3 * sum(rule_answers.values())  # thresholds at the median


def test_spurious_label_reads_the_twins(recipe):
    from cat_ds.data.records import CatRecord

    text = ("Smoking: 1, Weight: 1, Exercise: 9, Yellow fingers: 15, Clothing size: 10, Hormones: 0, "
            "Certain gene: 3, Room size: 4 Answer: ")
    assert recipe.spurious_label(CatRecord(text, "Low Risk", None)) == "High Risk"  # 12 + 7 - 0.5 > 7.2


@pytest.mark.slow
def test_tiny_run_prints_one_row_per_mode_and_seed(recipe, tmp_path, capsys):
    recipe.main(["--out", str(tmp_path), "--size", "S", "--epochs", "1", "--hidden", "32", "--layers", "2",
                 "--heads", "2", "--batch-size", "16", "--alpha", "10", "--pretrain-steps", "3",
                 "--pretrain-batch-size", "8", "--modes", "base,cat", "--seeds", "0"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[0]["pretrain"] and 0 <= lines[0]["probe_acc"] <= 1
    rows = [x for x in lines if "mode" in x]
    assert [(r["mode"], r["seed"]) for r in rows] == [("base", 0), ("cat", 0)]
    for r in rows:
        assert 0 <= r["iid"] <= 1 and 0 <= r["ood"] <= 1 and r["ood_conflict_n"] > 0
        assert math.isfinite(r["ratio_ood"]) and r["ratio_ood"] > 0
    summary = lines[-1]
    assert summary["summary"] and summary["delta_ood"] == pytest.approx(rows[1]["ood"] - rows[0]["ood"], abs=1e-3)
    assert any(p.name.startswith("pretrained_") for p in tmp_path.iterdir())  # cached for the next call


@pytest.mark.slow
def test_init_from_a_saved_checkpoint_starts_every_run_from_it(recipe, tmp_path, capsys):
    """--init-from: a saved model + tokenizer (e.g. the demo's engine pre-training) instead of the
    script's own tokenizer and pre-training; at lr 0 every run evaluates it unchanged."""
    from cat_ds.data.tokenizers import load_tokenizer

    recipe.main(["--out", str(tmp_path / "a"), "--size", "S", "--epochs", "1", "--hidden", "32", "--layers", "2",
                 "--heads", "2", "--batch-size", "16", "--modes", "base", "--seeds", "0"])
    capsys.readouterr()
    tok = load_tokenizer(tmp_path / "a" / "tok_512")
    args = recipe.parse_args(["--hidden", "32", "--layers", "2", "--heads", "2"])
    model = recipe.build_model(args, tok, 7)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    common = ["--out", str(tmp_path / "b"), "--size", "S", "--epochs", "1", "--lr", "0", "--modes", "base,cat", "--seeds", "0,1",
              "--init-from", str(tmp_path / "ckpt")]
    recipe.main(common)
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"mode"')]
    # Every run is the saved model, unchanged: the same attention ratio on OOD as measured on it here
    # (a fresh random init per seed would give a different ratio per seed).
    from cat_ds.data.collate import CatCollator
    from cat_ds.data.records import load_records
    from cat_ds.data.spans import tokenize_example

    ood = [tokenize_example(r, tok) for r in load_records(tmp_path / "b" / "stg_S_paper_0" / "test_ood.jsonl")]
    model.set_attn_implementation("cat_sdpa")
    want = round(recipe.attention_ratio(model, ood, CatCollator(tok.pad_token_id)), 3)
    assert len(rows) == 4 and {r["ratio_ood"] for r in rows} == {want}
    with pytest.raises(SystemExit, match="--init-from"):
        recipe.main(common + ["--pretrain-steps", "3"])


@pytest.mark.slow
def test_pretrain_only_probes_the_checkpoint_by_question_kind(recipe, tmp_path, capsys):
    """--modes "": pre-train (or reuse the cached checkpoint) and report accuracy per question kind."""
    argv = ["--out", str(tmp_path), "--size", "S", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--pretrain-steps", "3", "--pretrain-batch-size", "8", "--pretrain-questions", "2", "--modes", ""]
    for call in range(2):  # the second call reuses the cached checkpoint and probes it again
        recipe.main(argv)
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        assert [("pretrain" in x) for x in lines[:-1]] == ([True, False] if call == 0 else [False])
        probe = lines[-2]
        kinds = {"lookup", "compare", "threshold", "sum_threshold", "sum"}
        assert set(probe["probe_by_kind"]) == kinds | {"names"} and set(probe["probe_by_kind_stg_names"]) == kinds
        assert all(0 <= v <= 1 for v in probe["probe_by_kind_stg_names"].values())
        assert not any("mode" in x for x in lines)


@pytest.mark.slow
def test_pretraining_with_the_reattention_loss(recipe, tmp_path, capsys):
    """--pretrain-cat-alpha: the pre-training records carry annotations and the Re-Attention loss
    runs on them (it reports a CAT loss and ratio), cached under its own key."""
    argv = ["--out", str(tmp_path), "--size", "S", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--pretrain-steps", "3", "--pretrain-batch-size", "8", "--modes", "", "--verbose"]
    recipe.main(argv)
    assert "[pretrain] epoch 0" in (err := capsys.readouterr().err) and "cat_loss" not in err
    recipe.main(argv + ["--pretrain-cat-alpha", "10"])
    err = capsys.readouterr().err
    m = re.search(r"\[pretrain\] epoch 0 lm_loss=\S+ cat_loss=(\S+) train_ratio=(\S+)", err)
    assert m and math.isfinite(float(m[1])) and float(m[1]) < 0 and float(m[2]) > 0, err  # div: negative
    assert len(list(tmp_path.glob("pretrained_*.pt"))) == 2
    with pytest.raises(SystemExit, match="--pretrain-questions 1"):
        recipe.main(argv + ["--pretrain-cat-alpha", "10", "--pretrain-questions", "2"])
