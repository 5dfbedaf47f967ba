"""bench/stg_shortcut.py: twin rewriting and the answer-row attention table on a tiny model."""
from __future__ import annotations

import re

import pytest
from conftest import load_bench_script, tiny_model


@pytest.fixture(scope="module")
def shortcut():
    return load_bench_script("stg_shortcut")


def test_consistent_twins_follow_the_training_rule(shortcut):
    from cat_ds.data.records import CatRecord

    text = ("Here is the data. Yellow fingers: 2, Smoking: 9, Weight: 4, Hormones: 7, Exercise: 5, "
            "Clothing size: 1, Certain gene: 3, Room size: 8 Answer: ")
    out = shortcut.consistent_twins(CatRecord(text, "High Risk", None))
    assert "Yellow fingers: 13," in out.input and "Clothing size: 4," in out.input and "Hormones: 2," in out.input
    assert re.sub(r"(Yellow fingers|Clothing size|Hormones): \d+", "", out.input) == \
        re.sub(r"(Yellow fingers|Clothing size|Hormones): \d+", "", text)  # nothing else moved
    assert out.target == "High Risk"


def test_report_on_a_tiny_model(shortcut, tmp_path, capsys):
    from cat_ds.data.records import CatRecord, load_records
    from cat_ds.data.stg import write_stg
    from cat_ds.data.tokenizers import load_tokenizer, train_tokenizer

    write_stg(tmp_path / "data", task="stg", train_size="S", seed=0)
    train_tokenizer([tmp_path / "data" / "train.jsonl", tmp_path / "data" / "test_ood.jsonl"], "bpe", 512, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    model = tiny_model(vocab_size=len(tok), hidden=32, heads=2, gqa=False)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    records = load_records(tmp_path / "data" / "test_ood.jsonl")[:5]
    with pytest.raises(ValueError, match="eager"):
        shortcut.answer_row_mass(model.eval(), tok, records)
    model.set_attn_implementation("eager")
    mass = shortcut.answer_row_mass(model, tok, records)
    assert mass.shape == (2, 2, 3)
    assert mass.sum(-1).sub(1).abs().max() < 1e-5  # each head's row is a distribution over the prompt
    assert (mass[..., :2] > 0.05).all()  # an untrained model spreads over causal items and twins alike

    # Knock-out: with the twins hidden from every token, changing their values changes nothing the
    # label rows compute; hidden from the answer rows only, it still does (through other positions).
    rec = records[0]
    other = CatRecord(re.sub(r"(Yellow fingers|Clothing size|Hormones): \d+",
                             lambda m: f"{m[1]}: {int(m[0].split(': ')[1]) % 9 + 1}", rec.input), rec.target, None)
    assert other.input != rec.input and len(tok(other.input)["input_ids"]) == len(tok(rec.input)["input_ids"])
    scores = {k: (shortcut.label_scores(model, tok, rec, k), shortcut.label_scores(model, tok, other, k))
              for k in shortcut.KNOCKOUTS}
    assert scores["all_rows"][0] == pytest.approx(scores["all_rows"][1], abs=1e-5)
    for k in ("none", "answer_rows"):
        assert max(abs(a - b) for a, b in zip(*scores[k])) > 1e-4, k
    # With one layer the answer rows are the only path from the twins to the label's logits.
    one = tiny_model(vocab_size=len(tok), hidden=32, heads=2, gqa=False, layers=1)
    one.set_attn_implementation("eager")
    s1 = [shortcut.label_scores(one, tok, r, "answer_rows") for r in (rec, other)]
    assert s1[0] == pytest.approx(s1[1], abs=1e-5)
    s1 = [shortcut.label_scores(one, tok, r, "none") for r in (rec, other)]
    assert max(abs(a - b) for a, b in zip(*s1)) > 1e-4  # and without the knock-out they do matter
    assert 0 <= shortcut.knockout_accuracy(model, tok, records, "all_rows") <= 1
    with pytest.raises(ValueError, match="knockout"):
        shortcut.label_scores(model, tok, rec, "twins")

    shortcut.main(["--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"), "--attention-records", "3",
                   "--knockout-records", "3"])
    out = capsys.readouterr().out
    assert re.search(r"OOD accuracy \d\.\d{4}; with consistent twins \d\.\d{4}", out)
    for split in ("IID", "OOD"):
        assert re.search(rf"teacher-forced {split} accuracy on 3 records: as is \d\.\d{{4}}; answer rows blind to "
                         r"the twins \d\.\d{4}; every token blind to the twins \d\.\d{4}", out)
    assert out.count("layer ") == 2 and out.count("h1 ") == 2
