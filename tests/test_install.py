"""cat-ds as people install it: a wheel in a fresh virtual environment, run from a directory that
is not the checkout, finds its shipped DeepSpeed configs and recipes by name."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO
from engine_helpers import write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building writes build/ next to pyproject.toml
    top = {".venv", ".git", "build", "data", "runs", "demo_out"}  # the checkout's, not the package's cat_ds/data
    shutil.copytree(REPO, src, symlinks=True, ignore=lambda d, names: [
        n for n in names if (Path(d) == REPO and n in top) or n == "__pycache__" or n.endswith(".egg-info")])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("cat_ds-*.whl")
    venv = tmp / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # The dependencies come from the test environment (torch, deepspeed, ... take minutes to install);
    # a .pth appends them after the venv's own site-packages, so cat_ds itself is the wheel's.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True, capture_output=True, timeout=300)
    return venv


def test_the_wheel_ships_its_configs_and_trains_from_any_directory(fresh_venv, tmp_path, stg_dir, bpe_tokenizer):
    py = fresh_venv / "bin" / "python"
    where = subprocess.run([py, "-c", "import cat_ds; print(cat_ds.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(fresh_venv)), where  # not the checkout
    cfg = write_config(tmp_path, "run", stg_dir=stg_dir, tokenizer_dir=bpe_tokenizer.name_or_path,
                       train={"max_steps": 2})  # absolute paths to the model's config, tokenizer and data only
    p = subprocess.run([fresh_venv / "bin" / "cat-ds", "train", str(cfg), "--ds-config", "zero3"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 2/2" in p.stdout or (tmp_path / "run" / "metrics.jsonl").read_text().count('"loss"') == 2
    ds = (tmp_path / "run" / "ds_config.json").read_text()
    assert '"stage": 3' in ds
    # Recipes by name, too (their relative data paths resolve against the working directory).
    r = subprocess.run([fresh_venv / "bin" / "cat-ds", "train", "smollm2_stg", "--ds-config", "zero2",
                        "--set", "train.lr=-1"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "train.lr: must be >= 0" in r.stderr, r.stderr
