"""The engine built in this process (1 rank, gloo, real DeepSpeed ZeRO-3): gradient
checkpointing really runs during training, the exported model reproduces the engine's logits,
and gradient accumulation 1x4 equals 4x1 under global normalisation."""
from __future__ import annotations

import math
import os
import signal
import sys

import pytest
import torch

from engine_helpers import REPO, free_port, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist():
    """A 1-rank gloo process group in this process (restored afterwards)."""
    from cat_ds.engine.distributed import init_distributed, shutdown
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    excepthook = sys.excepthook
    try:
        yield init_distributed()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        sys.excepthook = excepthook
        unset_hf_deepspeed_config()
        shutdown()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trainer(tmp, name, stg_dir, tok, dist, ds_config="zero3", **sections):
    """The real trainer, set up in this process: no logger, no evaluation."""
    from cat_ds.config import load_config
    from cat_ds.engine.trainer import Trainer
    from cat_ds.tracking.base import NullLogger

    cfg = load_config(write_config(tmp, name, stg_dir=stg_dir, tokenizer_dir=tok.name_or_path, **sections))
    trainer = Trainer(cfg, str(REPO / "ds_configs" / f"{ds_config}.json"), info=dist, logger=NullLogger(),
                      evaluate=False)
    trainer.setup()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stg_dir, bpe_tokenizer, dist):
    return _trainer(tmp_path_factory.mktemp("engine_inproc"), "run", stg_dir, bpe_tokenizer, dist,
                   model={"gradient_checkpointing": True}, train={"max_steps": 3, "grad_accum": 2})


def _count_layer_calls(model) -> tuple[list[int], list]:
    calls = [0]
    # Hooks on the decoder layer itself stay outside the checkpoint (transformers checkpoints
    # `forward`), so count the attention module inside it; a pre-hook, because non-reentrant
    # recomputation stops early once the saved tensors are rebuilt.
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
             for layer in model.model.layers]
    return calls, hooks


def test_gradient_checkpointing_recomputes_during_training(trained):
    from cat_ds.engine.model import gradient_checkpointing_active

    model = trained.engine.module
    n_layers, accum = len(model.model.layers), trained.cfg.train.grad_accum
    assert model.training and gradient_checkpointing_active(model)
    calls, hooks = _count_layer_calls(model)
    try:
        trained.train_step(0)
        assert calls[0] == 2 * n_layers * accum  # forward + recomputation in backward, per micro-batch
        model.activation_checkpointing_disable()
        calls[0] = 0
        trained.train_step(1)
        assert calls[0] == n_layers * accum  # control: without checkpointing, one call per layer
    finally:
        for h in hooks:
            h.remove()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # the trap: eval mode silently switches checkpointing off ...
    assert not gradient_checkpointing_active(model)
    model.train()


def test_export_round_trip_logits_equal(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from cat_ds.engine.checkpoint import checkpoint_root
    from cat_ds.engine.export import export_checkpoint

    cfg, engine = trained.cfg, trained.engine
    assert trained.train(start_step=2) == "finished"  # one more step (of 3), then the final checkpoint
    batch = trained.batches.step(0)[0]
    engine.module.eval()
    with torch.no_grad():
        ref = engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    engine.module.train()
    out = export_checkpoint(checkpoint_root(cfg.output_dir), tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert ref.dtype == got.dtype == torch.float32
    # Real tokens only: the engine's "cat_sdpa" runs right-padded batches with the plain causal
    # kernel (exact on real tokens), the exported model's default sdpa masks padding, so the
    # logits at padded positions (never used) differ by design.
    from click.testing import CliRunner

    from cat_ds.cli import main

    res = CliRunner().invoke(main, ["export", str(checkpoint_root(cfg.output_dir)), str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    real = batch["attention_mask"].bool()
    assert bool((~real).any())  # the batch does have padding
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)


def test_grad_accum_1x4_equals_4x1_global_normalization(tmp_path, stg_dir, stg_h_dir, bpe_tokenizer, dist):
    """Same 4 examples per step as 1 micro-batch of 4 or 4 micro-batches of 1: with both losses
    normalised per step ("global"), the trajectory is the same up to fp32 summation order
    (rtol 1e-5 over 5 Adam steps; measured ~1e-7). Control: per-micro-batch ("micro")
    normalisation is off by 1e-4..5e-3 on this mixed STG + STG_H data."""
    runs = {}
    for name, micro, accum, norm in (("m4a1", 4, 1, "global"), ("m1a4", 1, 4, "global"), ("m1a4_micro", 1, 4, "micro")):
        trainer = _trainer(
            tmp_path, name, stg_dir, bpe_tokenizer, dist,
            # STG + STG_H mixed: micro-batches differ in supervised rows and answer tokens.
            data={"train": [str(stg_dir / "train.jsonl"), str(stg_h_dir / "train.jsonl")], "max_length": 256},
            train={"micro_batch_size": micro, "grad_accum": accum, "max_steps": 5, "lm_normalization": norm},
            cat={"enabled": True, "heads": 2, "normalization": norm})
        runs[name] = [trainer.train_step(s).metrics for s in range(5)]
    assert any(r["cat_loss"] != 0 for r in runs["m4a1"])
    for a, b in zip(runs["m1a4"], runs["m4a1"]):
        for k in ("loss", "lm_loss", "cat_loss", "grad_norm", "lr", "attn_ratio"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7) or (math.isnan(a[k]) and math.isnan(b[k])), \
                (k, a, b)
    # Control: per-micro-batch normalisation does depend on the split.
    assert any(not math.isclose(a["lm_loss"], b["lm_loss"], rel_tol=1e-3)
               for a, b in zip(runs["m1a4_micro"], runs["m4a1"]))


def test_cat_granularity_reaches_the_loss(tmp_path, stg_dir, bpe_tokenizer, dist):
    """cat.granularity goes from the config to the loss: the same first step (same weights, same
    batch) gives the same LM loss and a different Re-Attention loss per head than averaged."""
    first = {}
    for gran in ("all", "head"):
        trainer = _trainer(tmp_path, gran, stg_dir, bpe_tokenizer, dist,
                           train={"max_steps": 1}, cat={"enabled": True, "granularity": gran})
        first[gran] = trainer.train_step(0).metrics
    assert first["all"]["lm_loss"] == pytest.approx(first["head"]["lm_loss"], rel=1e-6)
    assert first["all"]["cat_loss"] != 0 and first["head"]["cat_loss"] != 0
    # Near-uniform attention at init: the two differ by ~1e-5, far above float32 noise (~1e-7) on
    # identical arithmetic; without the plumbing they would be bit-identical.
    assert abs(first["all"]["cat_loss"] - first["head"]["cat_loss"]) > 1e-6


def test_answer_only_logits_same_losses_and_gradients(tmp_path, stg_dir, bpe_tokenizer, dist):
    """The loop projects only answer positions onto the vocabulary (`logits_to_keep`); the full
    `labels=` path gives the same trajectory: 3 steps, CAT on, accumulation 2, both LM
    normalisations (per micro-batch mean; global sum / count through num_items_in_batch)."""
    for norm in ("micro", "global"):
        (tmp_path / norm).mkdir()
        runs = {}
        for keep in (True, False):
            trainer = _trainer(
                tmp_path / norm, f"keep_{keep}", stg_dir, bpe_tokenizer, dist,
                train={"max_steps": 3, "grad_accum": 2, "micro_batch_size": 4, "lm_normalization": norm},
                cat={"enabled": True})
            assert trainer.keep_logits  # Llama's forward takes the mask: the fast path is the one tested
            trainer.keep_logits = keep
            runs[keep] = [trainer.train_step(s).metrics for s in range(3)]
        for a, b in zip(runs[True], runs[False]):
            for k in ("loss", "lm_loss", "cat_loss", "grad_norm"):
                assert math.isclose(a[k], b[k], rel_tol=2e-5, abs_tol=1e-7), (norm, k, a[k], b[k])


@pytest.mark.parametrize("ds_config, want", [
    ("zero3", [1.0, 0.75, 0.5, 0.25]),  # WarmupDecayLR: linear from the peak, (T - k + 1) / T
    ("zero3_cosine", [1.0] + [0.1 + 0.9 * (1 + math.cos(math.pi * k / 3)) / 2 for k in (1, 2, 3)]),
])
def test_no_warmup_starts_at_the_peak_lr(tmp_path, stg_dir, bpe_tokenizer, dist, ds_config, want):
    """train.warmup_steps 0: step 1 runs at train.lr (DeepSpeed's Warmup* schedulers alone would give
    lr 0 on the first two steps), read back from the trainer's own lr metric."""
    trainer = _trainer(tmp_path, "lr", stg_dir, bpe_tokenizer, dist, ds_config,
                       train={"max_steps": 4, "lr": 1e-3, "warmup_steps": 0})
    lrs = [trainer.train_step(k).metrics["lr"] for k in range(4)]
    assert lrs == pytest.approx([1e-3 * w for w in want], rel=1e-9)


def test_warmup_keeps_deepspeeds_counting(tmp_path, stg_dir, bpe_tokenizer, dist):
    """With a warm-up the schedule is DeepSpeed's own (the README's figures were measured with it)."""
    trainer = _trainer(tmp_path, "lrw", stg_dir, bpe_tokenizer, dist, train={"max_steps": 6, "lr": 1e-3,
                                                                                 "warmup_steps": 2})
    lrs = [trainer.train_step(k).metrics["lr"] for k in range(4)]
    assert lrs == pytest.approx([0.0, 0.0, 0.5e-3, 1e-3], abs=1e-12)
