"""Launched by tests/test_eval_distributed.py with torchrun (2 ranks, gloo): every rank runs
`run_eval` on its shard; rank 0 writes the gathered result as JSON.

Modes: `plain` = every rank holds the full model (torch.distributed only);
`zero3` = the engine's `Trainer.setup` (DeepSpeed ZeRO-3, "cat_sdpa" attention) partitions the model,
so every forward inside generate() is a collective (a rank that stops early would hang)."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from cat_ds.data.records import load_records
from cat_ds.data.tokenizers import load_tokenizer
from cat_ds.evaluation import run_eval


def main(model_dir, data, out, batch_size, mode, cfg_path=None):
    recs = load_records(data)
    if mode == "plain":
        from transformers import AutoModelForCausalLM

        dist.init_process_group("gloo")
        tok = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    else:  # the engine's own set-up: HfDeepSpeedConfig + deepspeed.initialize, ZeRO-3 shards
        from cat_ds.config import load_config
        from cat_ds.engine.ds_config import zero_stage
        from cat_ds.engine.trainer import Trainer
        from cat_ds.tracking.base import NullLogger

        cfg = load_config(cfg_path)
        trainer = Trainer(cfg, str(Path(__file__).parents[1] / "ds_configs" / "zero3.json"), logger=NullLogger(),
                          evaluate=False)
        trainer.setup()
        assert zero_stage(trainer.ds_config) == 3
        model, tok = trainer.engine.module, trainer.tokenizer
        # Partitioned for real: this rank holds only part of every large weight.
        w = model.get_input_embeddings().weight
        assert w.numel() == 0 and w.ds_numel > 0, (w.shape, getattr(w, "ds_numel", None))
    res = run_eval(model, tok, recs, batch_size=int(batch_size))
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump({**res.summary(), "predictions": [p.prediction for p in res.predictions],
                       "world_size": dist.get_world_size(), "attn": model.config._attn_implementation}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    from cat_ds.engine.distributed import exit_process

    exit_process(0)  # as cat_ds/train.py: no interpreter finalisation racing gloo's threads
