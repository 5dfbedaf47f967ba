"""One training step on a real model, side by side: plain PyTorch, the engine (ZeRO-3 on 1 and
2 ranks, ZeRO-2), base and CAT, against the machine's FLOP limit; plus the start-up time of
`cat-ds train` to its first step.

    .venv/bin/python bench/step_time.py [--config configs/smollm2_stg.yaml] [--steps 5] [--json]
    .venv/bin/python bench/step_time.py --variants zero2x1,lora_zero2x1,zero3x1,lora_zero3x1 --per-mode --no-startup
    .venv/bin/python bench/step_time.py --config configs/stg_tiny.yaml --model-config configs/models/llama_1b.json \
        --layers 4 --variants "" --no-startup --steps 2 --warmup 1 --json   # peak memory, 1B layer shape

Every variant runs in a fresh process (its own threads and allocator), on the same STG batches
(the engine's data order: optimizer step s = the same 8 records everywhere; 2 ranks take 4
each). Per variant and mode: --warmup steps, then the median of --steps timed steps, the modes
interleaved step by step so background load hits both alike.
- plain: `cat_ds.engine.plain_step` (`from_pretrained`, `model(..., labels=...)`, backward, fused
  torch AdamW; CAT adds the engine's attention function and loss): the floor DeepSpeed's
  machinery is measured against (a timing reference, it trains nothing).
- zero3x1, zero3x2, zero2x1: `Trainer.train_step` of the engine (after `Trainer.setup`), with
  ds_configs/zero3.json or zero2.json, as `cat-ds train` runs them.
FLOP limit: 6 x parameters x non-padding tokens of the step / the rate of a 2048^2 fp32 matmul
on all cores (on a GPU: an 8192^2 bf16 matmul), measured in the same run; MFU is that limit
over the measured step. `--json` ends with one line of the ratios:
engine_over_plain (CAT, ZeRO-3, 1 rank, over plain CAT), cat_over_base (engine, ZeRO-3, 1 rank),
engine_over_flop_limit (engine CAT step over the limit), startup_s, and the peak memory of the steps
(CPU: the process's peak RSS after set-up; CUDA: max_memory_allocated) of base and CAT with
activation checkpointing off and on, each in a fresh process: cat_ckpt_extra_mib (CAT minus base,
both checkpointed) and cat_ckpt_budget_mib (one layer's supervised-row fp32 scores, rows x sampled
heads x T x 4 bytes, plus 10 % of base's peak); the bench exits 1 when the first is above the second.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = {"plain": (None, 1), "zero3x1": ("ds_configs/zero3.json", 1), "zero3x2": ("ds_configs/zero3.json", 2),
            "zero2x1": ("ds_configs/zero2.json", 1),
            # LoRA (not in the default list): the README's setting, r 8 on the attention projections
            "lora_zero2x1": ("ds_configs/zero2.json", 1), "lora_zero3x1": ("ds_configs/zero3.json", 1)}
LORA = "model.lora={r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}"
DEFAULT_VARIANTS = "plain,zero3x1,zero3x2,zero2x1"


def matmul_rate(n: int = 2048, reps: int = 5, bursts: int = 5) -> float:
    """FLOP/s of a large matmul in the training dtype: fp32 on CPU (all cores), bf16 on a GPU
    (n = 8192 there, where smaller matrices would not fill the device)."""
    import torch

    gpu = torch.cuda.is_available()
    n, dtype, dev = (8192, torch.bfloat16, "cuda") if gpu else (n, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    a @ b
    best = 0.0
    for _ in range(bursts):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def overrides(args, mode: str, out: str, micro: int) -> list[str]:
    lora = [LORA] if args.child and args.child.startswith("lora_") else []
    return [f"output_dir={out}", "train.save_every=0", "train.export=false", "tracking.mlflow=false",
            f"train.micro_batch_size={micro}", "train.grad_accum=1", f"cat.enabled={str(mode == 'cat').lower()}",
            "eval.probe_size=0", *lora, *args.set]


def reset_peak(device) -> None:
    """Start a fresh peak: CUDA's allocator counter, or the process's RSS high-water mark (Linux)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)


def step_peak_mib(device) -> float:
    """Peak since reset_peak: `max_memory_allocated` on CUDA, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    status = Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) / 1024


def scores_bytes(trainer, micro_batches, step: int) -> int:
    """The issue's budget unit: the supervised rows' scores of one selected layer, fp32:
    rows x sampled heads x sequence x 4 bytes (the largest micro-batch of the step)."""
    from cat_ds.reattention import select

    c = trainer.cfg
    layers, heads = select(trainer.num_layers, trainer.num_heads, layers=c.cat.layers, heads=c.cat.heads,
                           seed=c.train.seed, step=step)
    n_heads = max(trainer.num_heads if heads[layer] is None else heads[layer].numel() for layer in layers)
    return max(mb["cat_rows"].shape[0] * n_heads * mb["input_ids"].shape[1] * 4 for mb in micro_batches)


def child(args) -> None:
    """One variant, both modes; prints a JSON line (rank 0)."""
    import torch

    from cat_ds.config import load_config
    from cat_ds.engine.distributed import init_distributed

    ds_path, world = VARIANTS[args.child]
    info = init_distributed()
    micro = 8 // world
    steppers, batches = {}, None
    for mode in args.modes.split(","):
        cfg = load_config(args.config, overrides(args, mode, f"{args.work}/{args.child}_{mode}", micro))
        if ds_path is None:
            from cat_ds.data.collate import CatCollator
            from cat_ds.engine.data import StepBatches, tokenize_dataset
            from cat_ds.engine.model import load_tokenizer

            tok = load_tokenizer(cfg)
            data = tokenize_dataset(cfg.data.train, tok, max_length=cfg.data.max_length, min_gap=cfg.cat.min_gap,
                                    chat_template=cfg.data.chat_template,
                                    cache_dir=f"{args.work}/cache")
            from cat_ds.schedule import schedule

            batches = StepBatches(data, CatCollator(tok.pad_token_id), schedule(cfg, 1, len(data)), rank=0,
                                  seed=cfg.train.seed)  # micro 8 x accum 1 x 1 rank (the overrides above)
            from cat_ds.engine.plain_step import plain_stepper

            st = plain_stepper(cfg, info.device)
            steppers[mode] = (lambda s, st=st: st(batches.step(s)[0]))
        else:
            from cat_ds.engine.trainer import Trainer
            from cat_ds.tracking.base import NullLogger

            trainer = Trainer(cfg, ds_path, info=info, logger=NullLogger(), evaluate=False)
            trainer.setup()
            batches = trainer.batches
            steppers[mode] = (lambda s, trainer=trainer: trainer.train_step(s))
    times = {m: [] for m in steppers}
    tokens = []
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    reset_peak(info.device)  # the steps' peak, not the model load's
    for s in range(args.warmup + args.steps):
        for m, fn in steppers.items():
            sync()
            t0 = time.perf_counter()
            fn(s)
            sync()
            if s >= args.warmup:
                times[m].append(time.perf_counter() - t0)
        if s >= args.warmup:  # the step's real tokens over every rank
            t = torch.tensor([float(sum(int(mb["attention_mask"].sum()) for mb in batches.step(s)))])
            if world > 1:
                torch.distributed.all_reduce(t)
            tokens.append(float(t))
    if info.is_main:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        extra = {"step_peak_mib": step_peak_mib(info.device), "scores_mib": 0.0}
        if "cat" in steppers and ds_path is not None:
            extra["scores_mib"] = max(scores_bytes(trainer, batches.step(s), s)
                                      for s in range(args.warmup + args.steps)) / 2 ** 20
        print("RESULT " + json.dumps({"variant": args.child, "threads": torch.get_num_threads(), "peak_rss_mb": peak_mb,
                                      **extra,
                                      "tokens": statistics.mean(tokens),
                                      **{m: statistics.median(v) for m, v in times.items()},
                                      **{f"{m}_all": [round(x, 3) for x in v] for m, v in times.items()}}), flush=True)


def run_child(args, variant: str, modes: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    _, world = VARIANTS[variant]
    me = [str(Path(__file__).resolve()), "--child", variant, "--config", args.config, "--work", args.work,
          "--steps", str(args.steps), "--warmup", str(args.warmup), "--modes", modes or args.modes]
    for s in [*args.set, *extra]:
        me += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    if world == 1:
        cmd = [sys.executable, *me]
    else:  # the rule `cat-ds train` applies: the cores shared by the ranks
        from cat_ds.engine.preflight import threads_per_rank

        env["OMP_NUM_THREADS"] = str(threads_per_rank(world))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(29500 + os.getpid() % 1000), *me]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"{variant} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def memory(args) -> dict:
    """Peak memory of one engine step, base and CAT, activation checkpointing off and on: a fresh
    process each (--memory-variant, default ZeRO-3 on 1 rank). The budget CAT with checkpointing
    must stay within: the supervised rows' fp32 scores of one layer plus 10 % of base's peak."""
    peak, scores = {}, 0.0
    for ckpt in ("off", "on"):
        for m in ("base", "cat"):
            r = run_child(args, args.memory_variant, m, (f"model.gradient_checkpointing={str(ckpt == 'on').lower()}",))
            peak[f"{m}_ckpt_{ckpt}"] = r["step_peak_mib"]
            scores = max(scores, r["scores_mib"])
    return {"memory_variant": args.memory_variant, "peak_mib": peak, "scores_mib": scores,
            "cat_ckpt_extra_mib": peak["cat_ckpt_on"] - peak["base_ckpt_on"],
            "cat_ckpt_budget_mib": scores + 0.1 * peak["base_ckpt_on"]}


def model_config(args) -> str:
    """--model-config with num_hidden_layers set to --layers (written to the work dir): a model's
    layer shape (hidden, heads, MLP, vocab) at a depth this machine can fine-tune."""
    if not args.layers:
        return args.model_config
    d = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    d["num_hidden_layers"] = args.layers
    out = Path(args.work) / f"{Path(args.model_config).stem}_{args.layers}layers.json"
    out.write_text(json.dumps(d, indent=1), encoding="utf-8")
    return str(out)


def startup(args) -> float:
    """Seconds from `cat-ds train` (1 rank, MLflow on, as a user runs it) to its first step's start."""
    out = Path(args.work) / "startup"
    cmd = [str(Path(sys.executable).with_name("cat-ds")), "train", args.config]
    # one step, no warm-up (a warm-up as long as the run is refused by the schedule check)
    for s in [f"output_dir={out}", "train.max_steps=1", "train.warmup_steps=0", "train.export=false",
              "eval.probe_size=0", "data.eval={}", *args.set]:
        cmd += ["--set", s]
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    while p.poll() is None:
        if seen is None and metrics.is_file() and metrics.read_text().strip():
            seen = time.perf_counter()
        time.sleep(0.1)
    log = p.stdout.read()
    if p.returncode or not metrics.is_file():
        sys.exit(f"startup run failed (exit {p.returncode}):\n{log[-3000:]}")
    seen = seen or time.perf_counter()
    first = json.loads(metrics.read_text().splitlines()[0])
    return seen - t0 - first["step_time_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smollm2_stg.yaml")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--per-mode", action="store_true",
                   help="one process per variant and mode, so peak memory is one model's (LoRA vs full)")
    p.add_argument("--modes", default="base,cat")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--model-config", default=None, metavar="FILE",
                   help="random-init model from this config JSON (sets model.config, as bench/train_step.py)")
    p.add_argument("--layers", type=int, default=None, help="with --model-config: its layer shape, this many layers")
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (4 more processes)")
    p.add_argument("--memory-variant", default="zero3x1", choices=[v for v in VARIANTS if VARIANTS[v][0]],
                   help="the engine variant whose peak memory is measured (default zero3x1)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layers is not None and (not args.model_config or args.layers < 1):
        p.error("--layers: needs --model-config and a count >= 1")
    if args.model_config and not Path(args.model_config).is_file():
        p.error(f"--model-config: {args.model_config}: no such file")
    if args.child:
        child(args)
        return 0
    import torch

    from cat_ds.config import load_config
    from cat_ds.engine.model import load_model_config
    from cat_ds.engine.prepare import prepare_files

    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="step_time-")
    if args.model_config:  # the children get it through --set
        args.set.append(f"model.config={model_config(args)}")
    cfg = load_config(args.config, args.set)
    prepare_files(cfg)  # once, before anything is timed: a missing STG set, a GGUF model, a local tokenizer
    mc = load_model_config(cfg)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(mc).parameters())
    rate = matmul_rate()
    if args.per_mode:  # merge each variant's per-mode processes into one row; peak memory per mode
        rows = []
        for v in (v for v in args.variants.split(",") if v):
            parts = [run_child(args, v, m) for m in args.modes.split(",")]
            row = {k: x for part in parts for k, x in part.items() if k != "peak_rss_mb"}
            row.update({f"{m}_peak_rss_mb": part["peak_rss_mb"] for m, part in zip(args.modes.split(","), parts)})
            rows.append(row)
    else:
        rows = [run_child(args, v) for v in args.variants.split(",") if v]
    by = {r["variant"]: r for r in rows}
    modes = args.modes.split(",")
    tokens = rows[0]["tokens"] if rows else math.nan
    limit = 6 * n_params * tokens / rate
    name = cfg.model.name_or_path or args.model_config or cfg.model.config
    name += f", {args.layers} layers" if args.layers else ""
    res = {"model": name, "parameters": n_params, "tokens_per_step": tokens,
           "matmul_gflops": rate / 1e9, "flop_limit_s": limit, "torch": torch.__version__, "rows": rows}
    z = by.get("zero3x1", {})
    if "plain" in by and z and "cat" in modes:
        res["engine_over_plain"] = z["cat"] / by["plain"]["cat"]
    if "base" in modes and "plain" in by and z:
        res["engine_over_plain_base"] = z["base"] / by["plain"]["base"]
    if z and {"base", "cat"} <= set(modes):
        res["cat_over_base"] = z["cat"] / z["base"]
    if z and "cat" in modes:
        res["engine_over_flop_limit"] = z["cat"] / limit
    if not args.no_memory:
        res.update(memory(args))
    if not args.no_startup:
        res["startup_s"] = startup(args)
    if own_work:  # the start-up run's checkpoint alone is ~1.6 GB
        shutil.rmtree(args.work, ignore_errors=True)
    for r in rows:  # tokens/s and MFU (model FLOPs 6 x N x tokens over the measured matmul rate)
        for m in modes:
            r[f"{m}_tokens_per_s"] = r["tokens"] / r[m]
            r[f"{m}_mfu"] = 6 * n_params * r["tokens"] / r[m] / rate
    print(f"{res['model']}: {n_params / 1e6:.1f}M parameters, {res['tokens_per_step']:.0f} tokens/step, "
          f"matmul {rate / 1e9:.0f} GFLOP/s, FLOP limit {limit:.2f} s/step")
    mem = args.per_mode
    print("| variant | threads/rank | " + " | ".join(f"{m} s/step (median) | {m} tokens/s | {m} MFU"
                                                    + (f" | {m} peak RSS" if mem else "") for m in modes) + " |")
    print("|---|---|" + ("---|---|---|" + ("---|" if mem else "")) * len(modes))
    for r in rows:
        print(f"| {r['variant']} | {r['threads']} | " + " | ".join(
            f"{r[m]:.2f} | {r[f'{m}_tokens_per_s']:.0f} | {r[f'{m}_mfu']:.0%}"
            + (f" | {r[f'{m}_peak_rss_mb'] / 1024:.2f} GiB" if mem else "") for m in modes) + " |")
    for k in ("engine_over_plain", "engine_over_plain_base", "cat_over_base", "engine_over_flop_limit", "startup_s"):
        if k in res:
            print(f"{k}: {res[k]:.3f}")
    over = False
    if "peak_mib" in res:
        dev = "max_memory_allocated" if torch.cuda.is_available() else "peak RSS"
        print(f"peak memory of the steps ({dev} after set-up, {res['memory_variant']}), MiB:")
        print("| checkpointing | base | CAT | CAT - base |\n|---|---|---|---|")
        for ckpt in ("off", "on"):
            b, c = res["peak_mib"][f"base_ckpt_{ckpt}"], res["peak_mib"][f"cat_ckpt_{ckpt}"]
            print(f"| {ckpt} | {b:.0f} | {c:.0f} | {c - b:+.0f} |")
        over = res["cat_ckpt_extra_mib"] > res["cat_ckpt_budget_mib"]
        print(f"cat_ckpt_extra_mib: {res['cat_ckpt_extra_mib']:.1f} (budget {res['cat_ckpt_budget_mib']:.1f} = "
              f"scores {res['scores_mib']:.2f} + 10 % of base): {'OVER BUDGET' if over else 'within budget'}")
    if args.json:
        print(json.dumps(res))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
