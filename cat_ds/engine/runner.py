"""Set a run up and train it: the function `cat_ds/train.py` calls on every rank.

Order matters: config and ds_config are validated *before* torch.distributed or any model
(`check`), then data (main rank first: STG generation, tokenizer, tokenised cache), then the
final ds_config ("auto" filled with the real step count and model width), then the model
under `HfDeepSpeedConfig`, then `deepspeed.initialize`, resume, loop, export.
"""
from __future__ import annotations

import json
from pathlib import Path

from cat_ds.config import Config, ConfigError, dump_yaml, fill_ds_config, load_ds_config, unresolved_auto
from cat_ds.engine import checkpoint
from cat_ds.data.stg import ensure_stg
from cat_ds.engine.data import StepBatches, default_cache_dir, tokenize_dataset
from cat_ds.engine.distributed import DistInfo, barrier, init_distributed
from cat_ds.engine.loop import EvalFn, Loop
from cat_ds.engine.model import (build_model, gradient_checkpointing_active, load_model_config, load_tokenizer,
                                 model_source)


def _main_first(info: DistInfo, fn):
    """Run fn on rank 0, then on the others (they reuse what rank 0 wrote: files, caches)."""
    if info.is_main:
        out = fn()
        barrier()
    else:
        barrier()
        out = fn()
    return out


def _prepare_files(cfg: Config) -> None:
    """Main rank: generate a missing STG set, convert a GGUF model (once), train a missing local tokenizer."""
    ensure_stg(cfg.data.train + list(cfg.data.eval.values()), cfg.data.generate_stg)
    if cfg.model.name_or_path:
        model_source(cfg, convert=True)
    tok = cfg.model.tokenizer
    if cfg.model.config and tok and not Path(tok).exists() and cfg.model.train_tokenizer:
        from cat_ds.data.tokenizers import train_tokenizer

        vocab = load_model_config(cfg).vocab_size
        print(f"[cat-ds] {tok} missing: training a {cfg.model.train_tokenizer} tokenizer (vocab {vocab}) on "
              f"{cfg.data.train}", flush=True)
        train_tokenizer(cfg.data.train, cfg.model.train_tokenizer, vocab, tok)


def make_logger(cfg: Config, info: DistInfo, start_step: int, resumed: bool):
    from cat_ds.tracking.base import JsonlLogger, MultiLogger, NullLogger

    if not info.is_main:
        return NullLogger()
    jsonl = JsonlLogger(Path(cfg.output_dir) / "metrics.jsonl", truncate_after_step=start_step)
    if not cfg.tracking.mlflow:
        return jsonl
    from cat_ds.tracking.mlflow_logger import MlflowLogger, run_tags

    store = cfg.tracking.store_root or str(Path(cfg.output_dir).resolve().parent / "mlflow")
    ml = MlflowLogger(cfg.output_dir, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                      store_root=store, tracking_uri=cfg.tracking.tracking_uri, resume=resumed,
                      tags={**run_tags(cfg), "cat.enabled": cfg.cat.enabled})  # mode/task/seed: for compare
    return MultiLogger(jsonl, ml)


def setup(cfg: Config, ds_config_path: str, info: DistInfo | None = None):
    """Data, model and DeepSpeed engine. Returns (engine, batches, tokenizer, ds_config, total_steps, info)."""
    import deepspeed
    import torch

    info = info or init_distributed()
    # The checks ran before this process group existed (train.py, and the launcher before it); the
    # one fill below, with the real step count and model width, raises the same errors for direct callers.
    ds_raw = load_ds_config(ds_config_path)
    on_gpu = info.device.type == "cuda"
    if info.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        _prepare_files(cfg)
    barrier()
    tokenizer = load_tokenizer(cfg)
    cache = cfg.data.cache_dir or default_cache_dir(cfg.output_dir)
    dataset = _main_first(info, lambda: tokenize_dataset(cfg.data.train, tokenizer, max_length=cfg.data.max_length,
                                                         min_gap=cfg.cat.min_gap, cache_dir=cache,
                                                         chat_template=cfg.data.chat_template,
                                                         columns=cfg.data.columns))
    from cat_ds.data.collate import CatCollator

    t = cfg.train
    batches = StepBatches(dataset, CatCollator(tokenizer.pad_token_id), micro=t.micro_batch_size, accum=t.grad_accum,
                          world=info.world_size, rank=info.rank, seed=t.seed)
    total = t.max_steps if t.max_steps > 0 else t.epochs * batches.steps_per_epoch
    mcfg = load_model_config(cfg)
    ds = fill_ds_config(ds_raw, cfg, world_size=info.world_size, total_steps=total, on_gpu=on_gpu,
                        hidden_size=getattr(mcfg, "hidden_size", None), src=ds_config_path)
    left = unresolved_auto(ds)
    if left:
        raise ConfigError(f"{ds_config_path}: cat-ds cannot fill these \"auto\" values: {', '.join(left)}")
    if info.is_main:
        Path(cfg.output_dir, "config.yaml").write_text(dump_yaml(cfg))
        Path(cfg.output_dir, "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
        run = {"total_steps": total, "steps_per_epoch": batches.steps_per_epoch, "global_batch": batches.global_batch,
               "world_size": info.world_size}  # what a watcher of metrics.jsonl needs for progress and ETA
        Path(cfg.output_dir, "run.json").write_text(json.dumps(run) + "\n")
    model, hf_ds = build_model(cfg, ds, on_gpu=on_gpu, vocab_size=len(tokenizer))
    if info.is_main:  # under ZeRO-3 each rank holds ~1/world of every parameter from birth (zero.Init)
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        n_here = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
        print(f"[cat-ds] model: {n_all:,} parameters; rank 0 holds {n_here:,} after loading "
              f"(ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)}, world {info.world_size}; "
              f"activation checkpointing {'on' if gradient_checkpointing_active(model) else 'off'})", flush=True)
        if cfg.model.lora is not None:
            n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
            print(f"[cat-ds] LoRA r={cfg.model.lora.r} on {', '.join(cfg.model.lora.target_modules)}: "
                  f"{n_train:,} trainable parameters ({100 * n_train / n_all:.2f} %)", flush=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    engine._cat_ds_hf_ds = hf_ds  # keep HfDeepSpeedConfig alive as long as the engine
    torch.manual_seed(t.seed)
    return engine, batches, tokenizer, ds, total, info


def train(cfg: Config, ds_config_path: str, *, resume: str | None = None, evaluate: EvalFn | None = None,
          info: DistInfo | None = None) -> str:
    """Train on every rank; returns "finished" or "stopped" (after a SIGTERM/SIGUSR1 checkpoint)."""
    engine, batches, tokenizer, ds, total, info = setup(cfg, ds_config_path, info)
    start, resumed = 0, False
    if resume == "auto":
        state = checkpoint.load(engine, cfg.output_dir, rank=info.rank, world_size=info.world_size)
        if state is not None:
            start, resumed = int(state["step"]), True
            if state.get("global_batch") != batches.global_batch and info.is_main:
                print(f"[cat-ds] warning: global batch changed ({state.get('global_batch')} -> "
                      f"{batches.global_batch}); data order after resume differs from the original run", flush=True)
            if info.is_main:
                print(f"[cat-ds] resumed from {state['tag']} (step {start}, epoch {state['epoch']})", flush=True)
        elif info.is_main:
            print(f"[cat-ds] --resume auto: no checkpoint in {cfg.output_dir}, starting from scratch", flush=True)
    logger = make_logger(cfg, info, start, resumed)
    if info.is_main and not resumed:
        logger.log_params({**cfg.to_dict(), "ds_config": ds})
        for f in ("config.yaml", "ds_config.json"):  # the resolved configs, as written by setup()
            logger.log_artifact(Path(cfg.output_dir) / f, "config")
    def save_best(step: int, metric: str, value: float) -> None:  # collective: same decision on every rank
        checkpoint.save(engine, Path(cfg.output_dir) / "best", step=step, client_state={"step": step, metric: value},
                        rank=info.rank, keep_last=1, hf_files=lambda d: loop._hf_files(d))

    if evaluate is None:
        evaluate = default_evaluator(cfg, tokenizer, logger, on_best=save_best, train_examples=batches.ds)

    loop = Loop(cfg, engine, batches, tokenizer, info=info, total_steps=total, logger=logger, evaluate=evaluate)
    status = "failed"
    try:
        status = loop.run(start)
        if status == "finished" and cfg.train.export:
            if info.is_main:
                from cat_ds.engine.export import export_checkpoint

                out = export_checkpoint(checkpoint.checkpoint_root(cfg.output_dir), Path(cfg.output_dir) / "export")
                print(f"[cat-ds] exported Hugging Face model -> {out}", flush=True)
                logger.log_params({"export.path": str(Path(out).resolve())})
            # No barrier: the other ranks may leave; export of a large model can outlast a collective timeout.
    finally:
        logger.close("FINISHED" if status in ("finished", "stopped") else "FAILED")
    return status


def default_evaluator(cfg: Config, tokenizer, logger=None, on_best=None, train_examples=None) -> EvalFn | None:
    """Greedy generation accuracy on each `data.eval` set plus the attention probe (every rank
    takes part: ZeRO-3); rank 0 writes the predictions and logs them as artifacts.
    `on_best(step, metric, value)` is called on every rank when `eval.best_metric` improves."""
    from cat_ds.evaluation import Evaluator

    evaluator = Evaluator.from_config(cfg, tokenizer, train_examples)
    if evaluator is None:
        return None

    def evaluate(model, step: int) -> dict:
        out = evaluator(model, step)
        if logger is not None:
            for f in out.files:
                logger.log_artifact(f, f"predictions/step_{step}")
        if out.is_best and on_best is not None:
            on_best(step, evaluator.best_metric, evaluator.best_value)
        return out.metrics

    return evaluate
