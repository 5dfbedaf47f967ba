"""data.chat_template: records rendered with the real SmolLM2 chat template keep their causal
annotations on the same tokens, train on the assistant turn, and are prompted the same way in
evaluation."""
from __future__ import annotations

import pytest

from cat_ds.data.chat import ChatTemplateError, render, render_prompt
from cat_ds.data.records import load_records
from cat_ds.data.spans import tokenize_example
from cat_ds.evaluation.generate import prompt_ids


@pytest.fixture(scope="module")
def smol_tok(smol_cache):
    from cat_ds.data.tokenizers import load_tokenizer

    (model_dir,) = smol_cache.iterdir()
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def stg_records(tmp_path_factory):
    from cat_ds.data.stg import write_stg

    out = {}
    for task, size in (("stg", "S"), ("stg_h", "200")):
        d = tmp_path_factory.mktemp(task)
        write_stg(d, task=task, train_size=size, seed=0, test_size=20)
        out[task] = load_records(d / "train.jsonl")[:60] + load_records(d / "test_ood.jsonl")
    return out


def _value_tokens(ex):
    """The supervised rows' causal columns, as token ids (one set of values per key here)."""
    return {tuple(ex.input_ids[c] for c in cols) for _, cols in ex.rows}


def _answer_rows(ex):
    """Rows that produce answer tokens, counted from the answer's start."""
    return [q - ex.answer_start for q, _ in ex.rows if q >= ex.answer_start - 1]


@pytest.mark.parametrize("task", ["stg", "stg_h"])
def test_every_causal_phrase_maps_to_the_same_tokens_with_and_without_the_template(smol_tok, stg_records, task):
    records = stg_records[task]
    templated = render(records, smol_tok)
    n_rows = 0
    for plain_rec, chat_rec in zip(records, templated):
        plain, chat = tokenize_example(plain_rec, smol_tok), tokenize_example(chat_rec, smol_tok)
        assert not chat.skipped and not plain.skipped
        # The causal values (in the user turn) are the same tokens, and the rows producing the answer
        # read them as before. STG_H's key "Answer: 63" runs across the boundary: its "Answer: " rows
        # stay too, with the template's header rows between them and the answer's (chat.render).
        assert _value_tokens(chat) == _value_tokens(plain) and _answer_rows(chat) == _answer_rows(plain)
        if task == "stg":  # keys inside the target: exactly the same rows, shifted by the template
            shift = chat.answer_start - plain.answer_start
            assert [q for q, _ in chat.rows] == [q + shift for q, _ in plain.rows]
        else:
            assert len(chat.rows) > len(plain.rows) > len(_answer_rows(plain))
        # The answer (the key, in the assistant turn) is the target tokenised on its own, then
        # <|im_end|>, the model's end of turn: without the template "Answer: " + "High" folds
        # into " High"; after the assistant header the model writes "High", as in its chat tuning.
        im_end = smol_tok.convert_tokens_to_ids("<|im_end|>")
        own = smol_tok(chat_rec.target, add_special_tokens=False)["input_ids"]
        assert [t for t in chat.labels if t != -100] == own + [im_end]
        assert {chat.input_ids[q + 1] for q, _ in chat.rows if q >= chat.answer_start - 1} <= set(own)
        n_rows += len(chat.rows)
    assert n_rows >= len(records)  # the check saw real supervision (the label rows of every record)


def test_the_rendered_prompt_is_the_models_own_user_turn(smol_tok, stg_records):
    rec = stg_records["stg"][0]
    (chat,) = render([rec], smol_tok)
    assert chat.target == rec.target and chat.important == rec.important
    assert chat.input.startswith("<|im_start|>system\n") and chat.input.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{rec.input}<|im_end|>\n" in chat.input
    ex = tokenize_example(chat, smol_tok)
    # Evaluation asks with exactly the training prefix: the prompt stops at the assistant header.
    assert prompt_ids(smol_tok, chat.input, chat.target) == ex.input_ids[: ex.answer_start]
    assert smol_tok.decode(ex.input_ids[: ex.answer_start]) == chat.input


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    from cat_ds.data.stg import write_stg
    from cat_ds.data.tokenizers import train_tokenizer

    write_stg(tmp_path / "d", task="stg", train_size="S", seed=0, test_size=10)
    tok = train_tokenizer([tmp_path / "d" / "train.jsonl"], "bpe", 300, tmp_path / "tok")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_prompt(tok, "hello")


def test_the_engine_cache_tells_templated_from_plain(smol_tok, tmp_path, stg_records):
    import json

    from cat_ds.engine.data import tokenize_dataset

    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r.to_json()) + "\n" for r in stg_records["stg"][:8]))
    kw = dict(max_length=256, min_gap=1, cache_dir=tmp_path / "cache")
    plain = tokenize_dataset([str(f)], smol_tok, **kw)
    chat = tokenize_dataset([str(f)], smol_tok, chat_template=True, **kw)
    assert len(list((tmp_path / "cache").glob("tokenized-*.arrow"))) == 2
    assert len(chat[0]["input_ids"]) > len(plain[0]["input_ids"])
    assert chat[0]["labels"][-2:] == plain[0]["labels"][-2:]  # " Risk", <|im_end|>
