"""`cat-ds prepare`: the long set-up work of a run, done on every node *before* the ranks meet.

The ranks' own set-up waits in barriers under the collective timeout; converting a model or
tokenising a large dataset there can outlast it. Run once per node first
(`srun --ntasks-per-node 1 cat-ds prepare CONFIG ...`, as slurm/train_cat.sbatch does):
- every node: the model converted into its own cache (HOME may be node-local); nodes sharing a
  cache are safe, the conversion is atomic (cat_ds.sources);
- the first node only (SLURM_NODEID 0, or no Slurm): the shared files, i.e. a missing STG set,
  a missing local tokenizer, and the tokenised training set in the run's cache, which the ranks
  then load instead of building.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from cat_ds.config import Config


def tokenize_train(cfg: Config, tokenizer):
    """The training set, tokenised into (or loaded from) the run's cache: the call the ranks make."""
    from cat_ds.engine.data import default_cache_dir, tokenize_dataset

    cache = cfg.data.cache_dir or default_cache_dir(cfg.output_dir)
    return tokenize_dataset(cfg.data.train, tokenizer, max_length=cfg.data.max_length, min_gap=cfg.cat.min_gap,
                            cache_dir=cache, chat_template=cfg.data.chat_template, columns=cfg.data.columns)


def prepare_node(cfg: Config, node_id: int | None = None) -> str:
    """Do this node's share (see the module docstring); returns what was done, for one log line."""
    from cat_ds.engine.model import load_tokenizer, model_source
    from cat_ds.engine.prepare import prepare_files

    node_id = int(os.environ.get("SLURM_NODEID", "0")) if node_id is None else node_id
    done = []
    if node_id == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        prepare_files(cfg)  # STG set, model conversion, tokenizer
        n = len(tokenize_train(cfg, load_tokenizer(cfg)))
        done.append(f"{n} training records tokenised")
    elif cfg.model.name_or_path:
        model_source(cfg, convert=True)
    if cfg.model.name_or_path:
        done.insert(0, f"model {model_source(cfg)}")
    return f"{socket.gethostname()}: " + ("; ".join(done) or "nothing to prepare")
