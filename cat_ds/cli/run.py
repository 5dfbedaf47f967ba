"""`cat-ds train|prepare|doctor|plan|demo`: plan, check and run training, on one node or a cluster."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--task", type=click.Choice(["stg", "stg_h"]), default="stg")
@click.option("--size", type=click.Choice(["S", "M", "L"]), default="M", help="STG training size (400/800/1600).")
@click.option("--seeds", type=int, default=1, help="Seeds per mode (base and CAT share them).")
@click.option("--out", "out_dir", default="demo_out", type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A smoke run of the whole path in a few minutes (12 steps, 50+50 eval records).")
def demo(task, size, seeds, out_dir, quick):
    """The embedded default: SmolLM2-135M-Instruct fine-tuned on generated STG data, base vs CAT
    through the engine, IID/OOD evaluation, MLflow, and the compare table. Nothing is downloaded."""
    from cat_ds.demo import run_demo

    run_demo(task, size, seeds, Path(out_dir), quick)


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("config")
@click.option("--ds-config", default="zero3", show_default=True,
              help="A shipped DeepSpeed config by name (zero2, zero3, zero3_offload, zero3_cosine) or a JSON path "
                   "(\"auto\" values are filled from the run config).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes on this node. Default: number of GPUs, or 1 on CPU.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, e.g. --set train.lr=1e-4 (repeatable).")
@click.option("--resume", type=click.Choice(["auto", "none"]), default="none", help="auto: continue from the latest checkpoint.")
@click.option("--master-port", type=int, default=None, help="Rendezvous port (default: a free one).")
@click.option("--modes", default=None, help="base,cat: run the recipe in each mode (cat.enabled false/true) into "
              "OUTPUT_DIR/<mode>_s<seed>, then print the compare table.")
@click.option("--seeds", default=None, help="0,1,2: one run per seed (and mode); with --modes or alone.")
def train(config, ds_config, nproc, overrides, resume, master_port, modes, seeds):
    """Train CONFIG (a YAML path, or a shipped recipe's name: smollm2_stg, stg_tiny, ...) on this node:
    one rank runs cat_ds/train.py directly, more run under torchrun.
    With --modes/--seeds, one run after another for each seed x mode (a sweep through the engine)."""
    import os
    import sys

    from cat_ds.config import ConfigError, load_config
    from cat_ds.launch import launch, matrix

    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:  # the config is checked here, in one process, before anything starts
        if modes is None and seeds is None:
            sys.exit(launch(config, ds_config, nproc, overrides, resume, master_port, echo=echo))
        cfg = load_config(config, list(overrides))
        mode_list = modes.split(",") if modes else ["cat" if cfg.cat.enabled else "base"]
        seed_list = [int(s) for s in seeds.split(",")] if seeds else [cfg.train.seed]
        runs = matrix(cfg.output_dir, mode_list, seed_list)
        for i, (name, sets) in enumerate(runs, 1):
            click.echo(f"[cat-ds] run {i}/{len(runs)}: {name}", err=True)
            rc = launch(config, ds_config, nproc, [*overrides, *sets], resume, master_port, echo=echo)
            if rc != 0:
                raise click.ClickException(f"run {name} failed (exit {rc}); the runs after it were not started")
    except (ConfigError, ValueError) as e:
        raise click.ClickException(f"config error: {e}") from None
    from cat_ds.tracking.compare import compare as run_compare
    from cat_ds.tracking.mlflow_logger import resolve_tracking_uri

    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        resolve_tracking_uri(cfg.tracking.store_root or Path(cfg.output_dir) / "mlflow")
    if cfg.tracking.mlflow:
        click.echo(run_compare(uri, experiments=[cfg.tracking.experiment], out_dir=Path(cfg.output_dir) / "compare"))


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("config")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def prepare(config, train_args):
    """Before the ranks meet, on every node (`srun --ntasks-per-node 1 cat-ds prepare CONFIG ...`): convert
    the model into this node's cache; on the first node also generate/tokenise the shared data. Takes the
    training's own arguments (--set KEY=VALUE ..., --ds_config and --resume are ignored)."""
    from cat_ds.config import ConfigError, load_config
    from cat_ds.engine.prepare import prepare_node
    from cat_ds.train import parse_args

    args = parse_args(["--config", config, *train_args])
    try:
        click.echo(f"[cat-ds] prepared {prepare_node(load_config(args.config, args.overrides))}")
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None


@click.command()
@click.option("--config", default=None, help="Run config: its output_dir and model are checked.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, as for train.")
@click.option("--output-dir", default=None, help="Directory that must be shared by the nodes (default: the config's).")
@click.option("--wait", "wait_s", type=float, default=20.0, help="Seconds each cross-node check waits at most.")
def doctor(config, overrides, output_dir, wait_s):
    """On every node of an allocation (`srun --nodes N --ntasks-per-node 1 cat-ds doctor --config C`): one
    line per node (torch build, accelerator, CUDA/NCCL, interface and address, the head node's rendezvous port,
    shared output directory, model cache); exit 1 naming the first problem."""
    import sys

    from cat_ds.config import ConfigError, load_config
    from cat_ds.doctor import doctor as run_doctor

    try:
        cfg = load_config(config, list(overrides)) if config else None
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None
    report = run_doctor(cfg, output_dir, wait_s)
    click.echo(report.line())
    sys.exit(1 if report.problems else 0)


@click.command("plan")
@click.argument("config")
@click.option("--nodes", type=click.IntRange(min=1), default=1)
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8)
@click.option("--gpu-mem", "gpu_gib", type=float, default=80.0, help="GiB per GPU.")
@click.option("--cpu-mem", "cpu_gib", type=float, default=512.0, help="GiB of host memory per node.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, as for train.")
def plan_cmd(config, nodes, gpus_per_node, gpu_gib, cpu_gib, overrides):
    """Memory per GPU for CONFIG under ZeRO-2/3, with and without offload (model states from
    DeepSpeed's estimators, plus activations and CAT's recompute), and a verdict per option;
    and the optimizer-step schedule at nodes x GPUs: refused (exit 1) as `cat-ds train` would."""
    from cat_ds.config import ConfigError, load_config
    from cat_ds.plan import plan, run_schedule
    from cat_ds.schedule import check_schedule

    try:
        cfg = load_config(config, list(overrides))
        sched, why = run_schedule(cfg, nodes * gpus_per_node)
        click.echo(plan(cfg, nodes, gpus_per_node, gpu_gib, cpu_gib, sched=sched, sched_why=why))
        if sched is not None:
            check_schedule(sched, cfg, src=config)
    except ConfigError as e:
        raise click.ClickException(f"config error: {e}") from None
