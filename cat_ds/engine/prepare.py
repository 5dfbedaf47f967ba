"""Files a run needs before any rank reads them, made once by the main rank (of each node, where
nodes share no file system): a missing STG set generated, a GGUF model converted, a missing local
tokenizer trained. Importable on its own: a multi-host launcher calls `prepare_files` per node."""
from __future__ import annotations

from pathlib import Path

from cat_ds.config import Config
from cat_ds.data.stg import ensure_stg
from cat_ds.engine.distributed import DistInfo, barrier


def prepare_files(cfg: Config) -> None:
    """Main rank: generate a missing STG set, convert a GGUF model (once), train a missing local tokenizer."""
    from cat_ds.engine.model import load_model_config, model_source

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


def main_rank_first(info: DistInfo, fn):
    """Run fn on rank 0, then on the others (they reuse what rank 0 wrote: files, caches)."""
    if info.is_main:
        out = fn()
        barrier()
    else:
        barrier()
        out = fn()
    return out
