"""Generation for evaluation: the prompt equals the training prefix (both tokenizer families),
left-padded batches equal one-at-a-time, EOS/newline stops.

generate() under "cat_sdpa" (KV cache, q_len < k_len) vs stock SDPA: token-for-token in
tests/test_reattention_misc.py::test_generate_matches_stock_sdpa_with_left_padding, and end to
end in tests/test_eval_distributed.py::test_zero3_two_ranks_equal_one_rank (2 ZeRO-3 ranks with
cat_sdpa give the predictions of 1 rank with stock sdpa)."""

from __future__ import annotations

import pytest
import torch

from cat_ds.data.records import CatRecord
from cat_ds.data.spans import tokenize_example
from cat_ds.evaluation import run_eval
from cat_ds.evaluation.generate import default_max_new_tokens, generate_batch, prompt_ids
from eval_helpers import stg_records, tiny_model, train_tiny

MATH = [
    ("Tom has 3 apples and buys 5 more. How many apples? Answer: ", "8"),
    ("Q: 2+2=", "4"),
    ("Question: what is 12 + 7?\nAnswer:\n", "19"),
    ("Answer:  ", "42"),  # two spaces: the prefix keeps one of them on some vocabularies
    ("Pick one. Answer: ", "B"),
]


def _cases():
    from cat_ds.data.stg import generate_split

    stg = [(r["input"], r["target"]) for r in generate_split("stg", "iid", 6, seed=2)]
    stg_h = [(r["input"], str(r["target"])) for r in generate_split("stg_h", "ood", 6, seed=2)]
    return stg + stg_h + MATH


@pytest.mark.parametrize("family", ["bpe", "sentencepiece"])
def test_prompt_ids_equal_training_prefix(family, request):
    tok = request.getfixturevalue("bpe_tokenizer" if family == "bpe" else "sp_tokenizer")
    differs_from_raw = 0
    for inp, tgt in _cases():
        ex = tokenize_example(CatRecord(inp, tgt, None), tok)
        want = ex.input_ids[: ex.answer_start]
        assert prompt_ids(tok, inp, tgt) == want, (family, inp[-30:], tgt)
        # The prompt never contains an answer token: the answer continues it exactly.
        assert ex.input_ids[: len(want)] == want and len(want) < len(ex.input_ids)
        differs_from_raw += prompt_ids(tok, inp, tgt, mode="raw") != want
    # The trap is real on this data: tokenising "... Answer: " as is gives other ids.
    assert differs_from_raw >= 6


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def trained(request):
    tok = request.getfixturevalue("bpe_tokenizer" if request.param == "bpe" else "sp_tokenizer")
    model = train_tiny(tiny_model(tok), tok, stg_records(400, seed=5), steps=150)
    return model, tok


def test_batched_left_padding_equals_one_at_a_time(trained):
    model, tok = trained
    recs = stg_records(24, seed=3, split="iid")
    one = run_eval(model, tok, recs, batch_size=1)
    many = run_eval(model, tok, recs, batch_size=8)
    assert [p.prediction for p in many.predictions] == [p.prediction for p in one.predictions]
    assert one.accuracy >= 0.6, one.summary()  # a model that learned something: a real check
    assert {p.prediction for p in one.predictions} <= {"High Risk", "Low Risk", "Middle Risk"} | {
        p.prediction for p in one.predictions if not p.correct
    }
    # Prompt tokenised like training beats the prompt tokenised as is: the trailing-space trap (a BPE
    # tokenises "... Answer: " alone differently from the same prefix inside "... Answer: High").
    raw = run_eval(model, tok, recs, batch_size=8, prompt_mode="raw")
    assert one.accuracy > raw.accuracy, (one.summary(), raw.summary())


def test_stops_at_eos_and_optionally_at_newline(bpe_tokenizer):
    tok = bpe_tokenizer  # byte-level: "\n" is a real token (the tiny SentencePiece maps it to <unk>)
    recs = [{**r, "target": r["target"] + "\nreason: because"} for r in stg_records(300, seed=6)]
    model = train_tiny(tiny_model(tok), tok, recs, steps=200)
    test = recs[:16]
    budget = default_max_new_tokens(tok, [(r["input"], r["target"]) for r in test]) + 10
    prompts = [prompt_ids(tok, r["input"], r["target"]) for r in test]
    full = generate_batch(model, tok, prompts, max_new_tokens=budget, stop_at_newline=False)
    cut = generate_batch(model, tok, prompts, max_new_tokens=budget, stop_at_newline=True)
    has_nl = [f for f in full if "\n" in f]
    assert len(has_nl) >= 8, full  # the model learned to keep talking after a newline
    for f, c in zip(full, cut):
        assert c == f.split("\n", 1)[0].strip()
        assert "<|endoftext|>" not in f and "<|pad|>" not in f  # EOS/padding never reach the text
    # The stop rule ends generation at the newline (not only the text cut afterwards).
    from transformers import StoppingCriteriaList

    from cat_ds.evaluation.generate import _StopAtNewline

    p = torch.tensor([prompts[0]])
    kw = dict(max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    long = model.generate(input_ids=p, **kw)
    short = model.generate(input_ids=p, stopping_criteria=StoppingCriteriaList([_StopAtNewline(tok, p.shape[1])]), **kw)
    assert short.shape[1] < long.shape[1] and "\n" in tok.decode(short[0, p.shape[1]:])
    # Default: newline cut on for these targets? No: they contain a newline, so it is off.
    res = run_eval(model, tok, test, batch_size=8, max_new_tokens=budget)
    assert [p.prediction for p in res.predictions] == full
