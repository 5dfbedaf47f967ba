"""A launch without `cat-ds prepare` (deepspeed, torchrun per node, direct srun) on nodes with their own
HOME: the second node's local rank 0 (global rank 1 here) converts the GGUF model into its own cache
during set-up. Inside a process group transformers' save_pretrained writes weights only on rank 0, so
this conversion must happen outside it (engine/prepare.py): inside, it would write no weights and fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RANK = """
import sys
from cat_ds.config import load_config
from cat_ds.engine.distributed import init_distributed, shutdown
from cat_ds.engine.prepare import prepare_rank
from cat_ds.sources import resolve

cfg = load_config(sys.argv[1], [])
info = init_distributed()
prepare_rank(cfg, info)
print("model:", resolve(cfg.model.name_or_path, convert=False), flush=True)
shutdown()
"""


def test_the_second_nodes_local_rank_0_converts_the_model_into_its_own_cache(tmp_path, smol_cache, stg_dir):
    import yaml
    from safetensors import safe_open

    from cat_ds.launch import free_port

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"train": str(stg_dir / "train.jsonl")}}))
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    node2_cache = tmp_path / "node2_cache"  # node2's HOME: nothing converted yet
    port = str(free_port())
    procs = []
    for rank, cache in ((0, smol_cache), (1, node2_cache)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CAT_DS_MODEL_CACHE": str(cache)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(cfg)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [next(line for line in out.splitlines() if line.startswith("model: ")) for out in outs]
    assert lines[0] == f"model: {next(Path(smol_cache).iterdir())}" or lines[0].startswith(f"model: {smol_cache}")
    converted = Path(lines[1].removeprefix("model: "))
    assert converted.is_relative_to(node2_cache), lines
    with safe_open(converted / "model.safetensors", "pt") as f:  # the weights were written, all of them
        assert "model.embed_tokens.weight" in f.keys() and len(list(f.keys())) >= 270
    assert not list(node2_cache.rglob("*.tmp*")), "a conversion left its scratch directory behind"
