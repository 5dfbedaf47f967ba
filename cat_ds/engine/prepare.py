"""Per-run preparation, one owner: the files a run needs before any rank reads them.

What there is to do: a missing STG set generated, a GGUF model converted (into this node's cache:
HOME may be node-local), a missing local tokenizer trained, the training set tokenised into the
run's cache. Two callers, the same work, cheap once done:
- `prepare_node` (`cat-ds prepare`, once per node *before* the ranks meet, as slurm/train_cat.sbatch
  runs it, so nothing long runs while ranks wait): every node converts the model; the first node
  (SLURM_NODEID 0, or no Slurm) also makes the shared files and tokenises.
- `prepare_rank` (every rank's set-up, Trainer.setup): the same for a launch without that step
  (`deepspeed`, `torchrun` per node, direct `srun`): global rank 0 the shared files, each node's
  local rank 0 its model conversion, then a barrier (under the set-up timeout, engine/distributed.py).
Nodes sharing a cache do not race: a conversion is written aside and renamed into place (cat_ds.sources).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from cat_ds.config import Config
from cat_ds.data.stg import ensure_stg

if TYPE_CHECKING:  # torch only where ranks exist: `cat-ds prepare` on a node with nothing to do stays light
    from cat_ds.engine.distributed import DistInfo


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


def tokenize_train(cfg: Config, tokenizer):
    """The training set, tokenised into (or loaded from) the run's cache: `cat-ds prepare` and the ranks."""
    from cat_ds.engine.data import default_cache_dir, tokenize_dataset

    cache = cfg.data.cache_dir or default_cache_dir(cfg.output_dir)
    return tokenize_dataset(cfg.data.train, tokenizer, max_length=cfg.data.max_length, min_gap=cfg.cat.min_gap,
                            cache_dir=cache, chat_template=cfg.data.chat_template, columns=cfg.data.columns)


def prepare_node(cfg: Config, node_id: int | None = None) -> str:
    """`cat-ds prepare`: this node's share (see the module docstring); returns what was done, for one log line."""
    from cat_ds.engine.model import load_tokenizer, model_source

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


def prepare_rank(cfg: Config, info: DistInfo) -> None:
    """Every rank, in set-up: rank 0 makes the shared files, every other node's local rank 0 converts the
    model into its own cache; the others wait (barrier) before looking."""
    from cat_ds.engine.distributed import barrier

    if info.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        prepare_files(cfg)
    elif info.local_rank == 0 and cfg.model.name_or_path:
        _convert_outside_the_group(cfg)
    barrier()


def _convert_outside_the_group(cfg: Config) -> None:
    """A GGUF conversion on a rank other than 0, in a child process: inside a process group transformers'
    save_pretrained writes only on rank 0, so this rank would save no weights. Nothing to do once cached."""
    import subprocess
    import sys

    from cat_ds.config import ConfigError
    from cat_ds.sources import SourceError, resolve

    try:
        resolve(cfg.model.name_or_path, convert=False)
        return
    except SourceError:
        pass
    code = "import sys; from cat_ds.sources import resolve; resolve(sys.argv[1])"
    r = subprocess.run([sys.executable, "-P", "-c", code, cfg.model.name_or_path], stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"model.name_or_path: converting {cfg.model.name_or_path} on {socket.gethostname()} "
                          f"failed: {last}")


def main_rank_first(info: DistInfo, fn):
    """Run fn on rank 0, then on the others (they reuse what rank 0 wrote: files, caches)."""
    from cat_ds.engine.distributed import barrier

    if info.is_main:
        out = fn()
        barrier()
    else:
        barrier()
        out = fn()
    return out
