"""Entry point that the launchers run on every rank; it only parses arguments and calls the engine.

    deepspeed --num_gpus 2 cat_ds/train.py --ds_config ds_configs/zero3.json --config configs/stg_tiny.yaml
    torchrun --nproc_per_node 2 -m cat_ds.train --config configs/stg_tiny.yaml [--set train.lr=1e-4] [--resume auto]

Exit codes: 0 finished or stopped cleanly by SIGTERM/SIGUSR1 (a checkpoint was saved),
2 configuration error (found before any model is loaded), 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: cat_ds/ itself must not shadow top-level modules (config, data, ...)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="cat-ds training (run under deepspeed, torchrun, srun or plain python)")
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default="zero3",
                   help="DeepSpeed JSON path or shipped name (zero3, zero2, ...); \"auto\" values are filled from the run config")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.lr=1e-4 cat.enabled=true")
    p.add_argument("--resume", choices=["auto", "none"], default="none",
                   help="auto: continue from OUTPUT_DIR/checkpoints/latest if there is one")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    from cat_ds.config import ConfigError, load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from cat_ds.engine.device import check_gpu_ready, device_choice, device_env
        from cat_ds.engine.preflight import check

        # Before any model or process group. Every rank checks before rank 0 may write anything.
        check(cfg, args.ds_config, int(os.environ.get("WORLD_SIZE", "1")), args.resume)
        from cat_ds.engine.faults import Faults

        faults = Faults.from_env()  # tests only: None in every real run
        check_gpu_ready(probe=True)  # a direct srun/torchrun launch has had no launcher check this
        os.environ.update(device_env(device_choice()))  # DeepSpeed picks its accelerator when imported
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"cat-ds: config error: {e}", file=sys.stderr, flush=True)
        return 2
    from cat_ds.engine.checkpoint import CheckpointWriteError
    from cat_ds.engine.trainer import run

    try:
        status = run(cfg, args.ds_config, resume=None if args.resume == "none" else "auto", faults=faults)
    except ConfigError as e:
        print(f"cat-ds: config error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # leave without waiting on peers (see engine/distributed.py)
    except CheckpointWriteError as e:
        print(f"cat-ds: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the peers may wait in the save's barrier: the launcher stops them
    from cat_ds.engine.distributed import shutdown

    shutdown()
    return 0 if status in ("finished", "stopped") else 1


if __name__ == "__main__":
    code = main()
    from cat_ds.engine.distributed import exit_process

    exit_process(code)  # skips interpreter finalisation: see its docstring
