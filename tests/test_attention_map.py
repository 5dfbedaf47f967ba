"""`cat-ds attention`: the answer rows' attention on each earlier token, from the project's attention
function, checked against a plain eager pass; full-model and LoRA directories; records without
annotations or longer than the context; unreadable inputs; `cat-ds compare --attention` logging.
Tiny Llama models built from a config (nothing downloaded)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cat_ds.data.records import write_jsonl
from cat_ds.evaluation.attention_map import measure_dirs
from cat_ds.tracking.attention_plots import draw

CAT_DS = str(Path(sys.executable).parent / "cat-ds")
FIELDS = ["Smoking", "Weight", "Exercise", "Yellow fingers", "Clothing size", "Hormones", "Certain gene", "Room size"]


def save_tiny(path: Path, tokenizer, *, context: int = 256, seed: int = 0) -> Path:
    """A random tiny Llama (wide init: attention far from uniform) and its tokenizer, as export writes them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      initializer_range=0.3, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory, bpe_tokenizer):
    return save_tiny(tmp_path_factory.mktemp("attn") / "base", bpe_tokenizer)


def eager_shares(model_dir: Path, rec: dict) -> tuple[dict[str, float], list[dict[str, float]]]:
    """A record's group shares from transformers' eager attention weights (the full T x T maps)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        att = model(input_ids=torch.tensor([rec["input_ids"]]), output_attentions=True).attentions
    per_layer = [a[0].double().mean(dim=0)[rec["rows"]].mean(dim=0) for a in att]  # heads, then rows

    def shares(a):
        groups = {"causal": rec["causal"], **rec["fields"]}
        out = {g: float(a[cols].sum()) for g, cols in groups.items()}
        out["non-causal"] = float(a.sum()) - out["causal"]
        return out
    return shares(sum(per_layer) / len(per_layer)), [shares(a) for a in per_layer]


def test_shares_match_a_plain_eager_pass_and_every_file_is_drawn(full_dir, stg_dir, tmp_path):
    table = measure_dirs([full_dir], [stg_dir / "test_ood.jsonl"], records=3, per_layer=True, say=lambda s: None)
    files = draw(table, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert len(data["records"]) == 3 and data["problems"] == []
    rec = data["records"][1]
    assert set(rec["fields"]) == set(FIELDS)
    want, want_layers = eager_shares(full_dir, rec)
    got = rec["shares"]["base"]
    for g, v in want.items():
        assert got[g] == pytest.approx(v, abs=1e-5), g
    for layer, w in enumerate(want_layers):
        assert rec["shares_per_layer"]["base"][layer]["causal"] == pytest.approx(w["causal"], abs=1e-5)
    # The row's own token is part of the softmax: the shading of every column adds to 1 per row.
    assert sum(rec["attention"]["base"]) == pytest.approx(1.0, abs=1e-6)
    assert got["causal"] + got["non-causal"] == pytest.approx(1.0, abs=1e-6)
    assert 0.02 < got["causal"] < 0.98 and max(rec["attention"]["base"]) > 2 / len(rec["tokens"])  # not uniform
    # The table's mean is the mean over the records; the Markdown shows the same number.
    mean = sum(r["shares"]["base"]["causal"] for r in data["records"]) / 3
    assert data["summary"]["base"]["causal"]["mean"] == pytest.approx(mean)
    assert f"| causal | {100 * mean:.2f} (n=3) |" in (tmp_path / "out" / "attention.md").read_text()
    names = {f.name for f in files}
    assert {"shares.png", "layers.png", "attention.html", "attention.md"} <= names
    assert {f"record_{r['index']}.png" for r in data["records"]} <= names
    page = (tmp_path / "out" / "attention.html").read_text()
    assert "data:image/png;base64," in page and "Yellow fingers" in page and 'class="tok c' in page
    assert "src=\"http" not in page and "<link" not in page  # self-contained


def test_lora_adapter_and_merged_directories_agree_and_differ_from_the_base(full_dir, stg_dir, tmp_path):
    # As `cat-ds export` writes a LoRA run: the merged model, and the peft adapter in adapter/.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(full_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"],
                                           init_lora_weights=False, base_model_name_or_path=str(full_dir)))
    tok = AutoTokenizer.from_pretrained(full_dir)
    export = tmp_path / "export"
    peft.save_pretrained(str(export / "adapter"))
    tok.save_pretrained(export / "adapter")
    peft.merge_and_unload().save_pretrained(export)
    tok.save_pretrained(export)
    table = measure_dirs([full_dir, export, export / "adapter"], [stg_dir / "test_ood.jsonl"], records=2,
                         say=lambda s: None)
    base_l, merged_l, adapter_l = table.models
    assert (base_l, merged_l, adapter_l) == ("base", tmp_path.name, f"{tmp_path.name} (adapter)")
    for r in table.records:
        assert r.attention[merged_l] == pytest.approx(r.attention[adapter_l], abs=1e-5)
        assert max(abs(a - b) for a, b in zip(r.attention[merged_l], r.attention[base_l])) > 1e-3


def test_a_record_without_annotations_is_shaded_and_a_long_one_is_one_line(tmp_path, bpe_tokenizer):
    model_dir = save_tiny(tmp_path / "short", bpe_tokenizer, context=64)
    data = tmp_path / "mixed.jsonl"
    write_jsonl([{"input": "Smoking: 3, Weight: 5. Answer: ", "target": "High Risk",
                  "important": [{"High Risk": ["Smoking: 3"]}]},
                 {"input": "Exercise: 7, Room size: 2. Answer: ", "target": "Low Risk"},
                 {"input": "Smoking: 2, " * 40 + "Answer: ", "target": "Low Risk"}], data)
    table = measure_dirs([model_dir], [data], records=None, say=lambda s: None)
    assert [r.index for r in table.records] == [0, 1]
    annotated, plain = table.records
    assert annotated.causal and plain.causal == [] and plain.fields == {}
    # The rows that produce the target's tokens ("Low Risk"; not the EOS after it).
    ids = bpe_tokenizer("Exercise: 7, Room size: 2. Answer: Low Risk")["input_ids"]
    assert plain.rows[-1] == len(ids) - 2 and plain.input_ids == ids[:len(ids) - 1]
    assert sum(plain.attention["short"]) == pytest.approx(1.0, abs=1e-6)
    assert set(plain.shares("short")) == set()  # no group to share among: shading only
    assert table.summary()["short"]["causal"][1] == 1  # only the annotated record counts
    n_long = len(bpe_tokenizer("Smoking: 2, " * 40 + "Answer: Low Risk")["input_ids"]) - 1  # up to the last row
    assert table.problems == [f"{data.name}:3: {n_long} tokens, longer than the context of short (64); skipped for it"]
    files = draw(table, tmp_path / "out")
    assert (tmp_path / "out" / "record_1.png").is_file() and "longer than the context" in \
        (tmp_path / "out" / "attention.md").read_text()
    assert len([f for f in files if f.name.startswith("record_")]) == 2


def test_cli_unreadable_inputs_are_one_line_each_and_the_rest_is_drawn(full_dir, stg_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "target": 1}\n{"input": 5, "target": "y"}\n')
    not_model = tmp_path / "empty"
    not_model.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([CAT_DS, "attention", str(full_dir), str(not_model), str(tmp_path / "missing"),
                        "--data", str(stg_dir / "test_ood.jsonl"), "--data", str(tmp_path / "nope.jsonl"),
                        "--data", str(bad), "--records", "2", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("[attention]")]
    assert len(lines) == 4, p.stderr
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in lines[0]
    assert "bad.jsonl:2: input: expected a string, got 5; file skipped" in lines[1]
    assert str(not_model) in lines[2] and "cannot load the model" in lines[2]
    assert f"{tmp_path / 'missing'}: cannot load the model" in lines[3]
    assert (tmp_path / "out" / "shares.png").is_file() and f"[attention] {tmp_path / 'out' / 'attention.html'}" in p.stdout
    none = subprocess.run([CAT_DS, "attention", str(not_model), "--data", str(stg_dir / "test_ood.jsonl")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert none.returncode != 0 and "nothing to draw" in none.stderr


def test_compare_draws_base_vs_cat_and_logs_to_both_runs(full_dir, stg_dir, tmp_path, bpe_tokenizer):
    from mlflow import MlflowClient

    from cat_ds.tracking.compare import draw_attention
    from cat_ds.tracking.mlflow_logger import MlflowLogger

    cat_dir = save_tiny(tmp_path / "cat", bpe_tokenizer, seed=1)
    root = tmp_path / "runs"
    ids = {}
    for mode, d in (("base", full_dir), ("cat", cat_dir), ("cat_unexported", None)):
        lg = MlflowLogger(tmp_path / mode, experiment="att", tags={"task": "stg", "mode": mode.split("_")[0], "seed": 0},
                          store_root=root, system_metrics_s=None, log_environment=False)
        lg.log_params({"export.path": str(d)} if d else {"output_dir": str(tmp_path / "nowhere")})
        lg.close(plots=False)
        ids[mode] = lg.run_id
    uri = f"sqlite:///{root / 'mlflow.db'}"
    said = []
    files = draw_attention(uri, [str(stg_dir / "test_ood.jsonl")], tmp_path / "cmp", experiments=["att"], records=2,
                           say=said.append)
    assert any(ids["cat_unexported"] in s and "no exported model" in s for s in said)
    data = json.loads((tmp_path / "cmp" / "stg_s0" / "attention.json").read_text())
    assert list(data["models"]) == ["base", "cat"] and "Hormones" in data["summary"]["cat"]
    client = MlflowClient(uri)
    for mode in ("base", "cat"):
        logged = {Path(a.path).name for a in client.list_artifacts(ids[mode], "attention")}
        assert logged == {f.name for f in files}
