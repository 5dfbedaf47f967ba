"""LoRA (peft) in the engine: CAT's gradient reaches the adapters and equals the dense reference;
2 ranks of ZeRO-3 with CAT train the real SmolLM2's adapters into a checkpoint that holds only them and
export an adapter and a merged model that agree; under ZeRO-2 and ZeRO-3 a run stopped and resumed
from such a checkpoint equals the uninterrupted one, bit for bit (the tiny model: seconds per run)."""
from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reattention_ref import lm_loss, make_batch, reference, tiny_model

from cat_ds.config import ConfigError, LoraSettings
from cat_ds.engine.lora import apply_lora
from cat_ds.reattention import CatContext, reattention_loss, select
from engine_helpers import TINY_MODEL, launch, metrics, state, tail, write_config

TOL = 1e-9


def _lora(model, **kw):
    peft = apply_lora(model, LoraSettings(r=4, alpha=8.0, **kw))
    with torch.no_grad():  # B starts at 0 (so would A's gradient): make both live
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return peft


def test_cat_gradient_reaches_the_adapters_and_equals_the_dense_reference():
    base = tiny_model("llama", gqa=True, seed=3)
    model = _lora(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    batch = make_batch([24, 17], seed=3)
    layers, heads = select(2, 4, seed=0, step=0)
    with torch.no_grad():
        _, _, ratios = reference(copy.deepcopy(model), batch, alpha=0, loss_type="div")
    mid = sorted(ratios)[len(ratios) // 2 - 1: len(ratios) // 2 + 1]
    alpha = sum(mid) / 2  # some rows active, some not, none on the edge

    ref = copy.deepcopy(model)
    ref_lm, ref_cat, _ = reference(ref, batch, alpha=alpha, loss_type="div")
    (ref_lm + 0.7 * ref_cat).backward()

    model.set_attn_implementation("cat_sdpa")
    ctx = CatContext.from_batch(batch, layers=layers, heads=heads, num_heads=4)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    res = reattention_loss(ctx, alpha=alpha, loss_type="div")
    assert abs(float((res.loss - ref_cat).detach())) < TOL and abs(float(ref_cat.detach())) > 1e-3
    (lm_loss(out.logits, batch["labels"]) + 0.7 * res.loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads) == trainable  # nothing frozen moves
    for n in trainable:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=TOL, rtol=0, msg=lambda m: f"{n}: {m}")

    # The Re-Attention loss alone moves the query/key adapters (it acts through the attention pattern).
    model.zero_grad()
    ctx = CatContext.from_batch(batch, layers=layers, heads=heads, num_heads=4)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cat=ctx)
    reattention_loss(ctx, alpha=alpha, loss_type="div").loss.backward()
    for proj in ("q_proj", "k_proj"):
        g = [p.grad for n, p in model.named_parameters() if proj in n and "lora_A" in n]
        assert g and all(x is not None and float(x.abs().max()) > 0 for x in g), proj


def test_an_unknown_target_module_lists_the_models_linear_modules():
    with pytest.raises(ConfigError, match=r"qkv_proj match no linear module.*down_proj, gate_proj, k_proj, lm_head, "
                                          r"o_proj, q_proj, up_proj, v_proj"):
        apply_lora(tiny_model(), LoraSettings(target_modules=["q_proj", "qkv_proj"]))


LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _ref_cut_resume(tmp, common, ds_config):
    ref = launch(write_config(tmp, "ref", **common), 2, launcher="torchrun", ds_config=ds_config, timeout=600)
    assert ref.returncode == 0, tail(ref)
    cut_cfg = write_config(tmp, "cut", **common)
    first = launch(cut_cfg, 2, env={"CAT_DS_TEST_FAULTS": f"signal_at=2:{int(signal.SIGTERM)}"}, launcher="torchrun",
                   ds_config=ds_config, timeout=600)
    assert first.returncode == 0 and "stop signal received" in first.stdout, tail(first)
    second = launch(cut_cfg, 2, "--resume", "auto", launcher="torchrun", ds_config=ds_config, timeout=600)
    assert second.returncode == 0 and "resumed from step_" in second.stdout, tail(second)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, stg_dir, smol_cache):
    """The issue's setting on the real SmolLM2: r 8 on q/k/v/o, ZeRO-3 over 2 ranks, CAT, activation
    checkpointing."""
    tmp = tmp_path_factory.mktemp("lora")
    (base,) = smol_cache.iterdir()
    cfg = write_config(tmp, "ref", stg_dir=stg_dir, tokenizer_dir=None,
                       model={"config": None, "tokenizer": None, "name_or_path": "smollm2-135m-instruct",
                              "gradient_checkpointing": True, "lora": LORA},
                       train={"micro_batch_size": 2, "max_steps": 4, "lr": 2e-3, "export": True},
                       cat={"enabled": True, "heads": "all"}, eval={"limit": 4, "batch_size": 4, "probe_size": 2},
                       data={"train": str(stg_dir / "train.jsonl"), "eval": {"iid": str(stg_dir / "test_iid.jsonl")},
                             "max_length": 96, "cache_dir": str(tmp / "cache")})
    ref = launch(cfg, 2, launcher="torchrun", ds_config="ds_configs/zero3.json", timeout=600,
                 env={"CAT_DS_MODEL_CACHE": str(smol_cache)})
    assert ref.returncode == 0, tail(ref)
    return tmp, ref, base


def test_zero3_two_ranks_train_the_adapters_of_the_sharded_model(lora_runs):
    tmp, ref, _ = lora_runs
    assert "LoRA r=8 on q_proj, k_proj, v_proj, o_proj:" in ref.stdout
    m = __import__("re").search(r"model: ([\d,]+) parameters; rank 0 holds ([\d,]+)", ref.stdout)
    total, local = (int(g.replace(",", "")) for g in m.groups())
    assert total > 134_515_008 and local < 0.51 * total  # the frozen base is loaded sharded (small ones whole)
    rows = [r for r in metrics(tmp / "ref") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["cat_loss"] != 0 for r in rows)


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_and_resume_from_an_adapter_checkpoint_is_bit_exact(stage, tmp_path, stg_dir, bpe_tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_MODEL)).save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    common = dict(stg_dir=stg_dir, tokenizer_dir=None,
                  model={"config": None, "name_or_path": str(tmp_path / "base"), "lora": LORA},
                  train={"max_steps": 4, "lr": 1e-2, "export": True}, cat={"enabled": True, "heads": "all"})
    _ref_cut_resume(tmp_path, common, f"ds_configs/zero{stage}.json")
    a, b = ([r for r in metrics(tmp_path / d) if "loss" in r] for d in ("ref", "cut"))
    assert len(a) == 4 and state(b) == state(a)
    # The resumed run exports the same adapters.
    ref, cut = (load_file(tmp_path / d / "export" / "adapter" / "adapter_model.safetensors") for d in ("ref", "cut"))
    assert ref.keys() == cut.keys() and ref and all(torch.equal(ref[k], cut[k]) for k in ref)


def test_checkpoints_hold_the_adapters_not_the_frozen_base(lora_runs):
    tmp, _, base = lora_runs
    (ck,) = [p for p in (tmp / "ref" / "checkpoints").iterdir() if p.name.startswith("step_")]
    size = sum(f.stat().st_size for f in ck.rglob("*.pt"))
    base_size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert size < 20e6 < base_size, (size, base_size)  # adapters + their Adam moments, not the 538 MB base


def test_export_writes_an_adapter_and_a_merged_model_that_agree(lora_runs, stg_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _, base_dir = lora_runs
    export = tmp / "ref" / "export"
    assert (export / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(export)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = torch.tensor([[1, 520, 33, 1035, 28, 216, 34]])
    with torch.no_grad():
        m, a, b = merged(ids).logits, adapted(ids).logits, base(ids).logits
    # Merging W + BA into one matrix reorders fp32 sums: ~6e-5 apart on logits of size ~20, 30 layers deep.
    torch.testing.assert_close(m, a, atol=2e-4, rtol=1e-4)
    assert torch.equal(m.argmax(-1), a.argmax(-1))
    assert float((m - b).abs().max()) > 1e-3  # the adapters did train
    # cat-ds eval works on both exports, with the same predictions.
    data = tmp / "iid4.jsonl"
    data.write_text("".join((stg_dir / "test_iid.jsonl").read_text().splitlines(keepends=True)[:4]))
    preds = []
    for d in (export, export / "adapter"):
        p = subprocess.run([str(Path(sys.executable).with_name("cat-ds")), "eval", "--model", str(d), "--data",
                            str(data), "--predictions", str(tmp / f"{d.name}.jsonl"), "--json"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        preds.append((tmp / f"{d.name}.jsonl").read_text())
    assert preds[0] == preds[1]
