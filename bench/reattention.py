"""Benchmark: base step vs CAT step vs research-style step (forward + backward).

    .venv/bin/python bench/reattention.py [--device cpu|cuda] [--seq-len N ...] [--json]

Same process, same model weights, same batch for the three steps:
- base: SDPA attention, LM loss only;
- cat: "cat_sdpa" attention (fast-kernel output + sparse exact mass on C) + LM loss + CAT loss;
- research: eager attention, output_attentions=True (every layer's full maps), the spec's
  Python loop over every row of every sample on a dense mask, reimplemented from docs/METHOD.md section 3.
Supervision: --rows supervised rows per sequence (query positions in the second half, where
answers are), each with --cols causal columns drawn from the positions before it.

Peak memory is the extra memory of one step over the state just before it (weights, batch),
measured for each (variant, length) in a fresh child process that builds the same model and
batch: CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the RSS before
the step, with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so freed buffers go back
to the OS; CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the step.
Times: best of --repeat steps after one warm-up step, the variants interleaved round by round
(medians and process CPU times are in the JSON too), in this process with the default malloc.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cat_ds.reattention import CatContext, reattention_loss, select  # noqa: E402


def make_batch(bsz: int, seq: int, rows: int, cols: int, vocab: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (bsz, seq), generator=g)
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100
    row_list, ptr, col_list = [], [0], []
    for b in range(bsz):
        qs = torch.randperm(seq - seq // 2 - 1, generator=g)[:rows] + seq // 2
        for q in sorted(qs.tolist()):
            c = torch.randperm(q, generator=g)[:cols].sort().values.tolist()
            row_list.append((b, q))
            col_list.extend(c)
            ptr.append(len(col_list))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "cat_rows": torch.tensor(row_list), "cat_col_ptr": torch.tensor(ptr), "cat_cols": torch.tensor(col_list)}
    return {k: v.to(device) for k, v in batch.items()}


def dense_mask(batch: dict) -> torch.Tensor:
    """The research code's per-record T x T mask (built outside the timed step)."""
    bsz, seq = batch["input_ids"].shape
    m = torch.zeros((bsz, seq, seq), device=batch["input_ids"].device)
    ptr, cols = batch["cat_col_ptr"].tolist(), batch["cat_cols"]
    for r, (b, q) in enumerate(batch["cat_rows"].tolist()):
        m[b, q, cols[ptr[r]:ptr[r + 1]]] = 1
    return m


def research_loss(attentions, mask: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """docs/METHOD.md section 3 as the research code does it: Abar over all layers and heads, a Python loop
    over every row of every sample, div loss, divided by the non-skipped rows."""
    abar = torch.stack(attentions).mean(dim=0).mean(dim=1)  # (B, T, T)
    total, count = abar.new_zeros(()), 0
    for b in range(mask.shape[0]):
        for q in range(mask.shape[1]):
            row = mask[b, q, : q + 1]
            s = int(row.sum())
            if s == 0 or s == q + 1:
                continue
            a1 = abar[b, q, : q + 1][row == 1].mean()
            a0 = abar[b, q, : q + 1][row == 0].mean()
            count += 1
            if a1 / a0 < alpha:
                total = total - torch.log(1 + a1) / torch.log(1 + a0)
    return total / max(count, 1)


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Extra peak memory (MB) of the enclosed code over the state at entry."""

    def __init__(self, device):
        self.device = device
        self.mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kb("VmHWM") * 1024
        self.mb = (peak - self.start) / 2**20


def time_steps(steps: dict, model, device, repeat: int) -> dict[str, dict[str, float]]:
    """{name: {best, median, cpu}} in ms: one warm-up each, then `repeat` rounds interleaving
    the variants, so load from other processes hits them alike. `cpu` is the best process CPU
    time (user + sys) of a step: on a shared CPU machine it is what the step itself costs,
    where wall time also counts the time other processes held the cores."""
    def once(step) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000

    for step in steps.values():
        once(step)
    times = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            times[name].append(once(step))
    model.zero_grad(set_to_none=True)
    return {name: {"best": min(w for w, _ in t), "median": statistics.median(w for w, _ in t),
                   "cpu": min(c for _, c in t)} for name, t in times.items()}


def probe_memory(variant: str, seq: int, argv: list[str], device) -> float:
    """Run one step of `variant` in a fresh child process and return its extra peak MB."""
    env = dict(os.environ)
    if device.type == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # also disables glibc's dynamic threshold
    cmd = [sys.executable, __file__, *argv, "--seq-len", str(seq), "--memory-probe", variant]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32, help="supervised rows per sequence")
    ap.add_argument("--cols", type=int, default=16, help="causal columns per row")
    ap.add_argument("--heads", default="all", help="CAT heads per layer: all | K")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bf16 on CUDA")
    ap.add_argument("--research-max-len", type=int, default=2048, help="skip the research step above this length")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="one JSON object per length")
    ap.add_argument("--memory-probe", choices=["base", "cat", "research"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    child_argv = [a for a in argv if a != "--json"]
    if "--seq-len" in child_argv:  # the child gets exactly one length
        i = child_argv.index("--seq-len") + 1
        while i < len(child_argv) and not child_argv[i].startswith("--"):
            child_argv.pop(i)
        child_argv.pop(child_argv.index("--seq-len"))

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq_len))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    shape = (f"Llama {args.layers} layers, hidden {args.hidden}, {args.n_heads} heads / {args.kv_heads} KV heads, "
             f"MLP {args.intermediate}, vocab {args.vocab}, {n_params / 1e6:.1f}M params, {dtype}, {device.type}, "
             f"batch {args.batch_size}, {args.rows} rows x {args.cols} cols per sequence, CAT heads={args.heads}, "
             f"torch threads {torch.get_num_threads()}")
    if not args.json and not args.memory_probe:
        print(shape)
        print(f"{'T':>6} {'base ms':>9} {'cat ms':>9} {'research ms':>12} {'cat/base':>9} {'res/cat':>8} "
              f"{'cpu cat/base':>13} {'cpu res/cat':>12} {'base MB':>9} {'cat MB':>9} {'research MB':>12}")
    for seq in args.seq_len:
        batch = make_batch(args.batch_size, seq, args.rows, args.cols, args.vocab, seed=seq, device=device)
        layers, heads = select(args.layers, args.n_heads, heads=args.heads, seed=0, step=0)

        def base_step():
            model.set_attn_implementation("sdpa")
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()

        def cat_step():
            model.set_attn_implementation("cat_sdpa")
            ctx = CatContext.from_batch(batch, layers=layers, heads=heads, num_heads=args.n_heads)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        cat=ctx)
            (out.loss + reattention_loss(ctx).loss).backward()

        mask = dense_mask(batch)

        def research_step():
            model.set_attn_implementation("eager")
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        output_attentions=True)
            (out.loss + research_loss(out.attentions, mask)).backward()

        steps = {"base": base_step, "cat": cat_step, "research": research_step}
        if args.memory_probe:
            model.zero_grad(set_to_none=True)
            with PeakMemory(device) as mem:
                steps[args.memory_probe]()
            print(json.dumps({"peak_mb": mem.mb}))
            return
        if seq > args.research_max_len:
            del steps["research"]
        timed = time_steps(steps, model, device, args.repeat)
        base_ms, cat_ms = timed["base"]["best"], timed["cat"]["best"]
        research_ms = timed["research"]["best"] if "research" in timed else None
        research_mb = None
        del mask
        base_mb = probe_memory("base", seq, child_argv, device)
        cat_mb = probe_memory("cat", seq, child_argv, device)
        if seq <= args.research_max_len:
            research_mb = probe_memory("research", seq, child_argv, device)
        rec = {"seq_len": seq, "base_ms": round(base_ms, 1), "cat_ms": round(cat_ms, 1),
               "research_ms": None if research_ms is None else round(research_ms, 1),
               "base_peak_mb": round(base_mb, 1), "cat_peak_mb": round(cat_mb, 1),
               "research_peak_mb": None if research_mb is None else round(research_mb, 1)}
        for k, v in timed.items():
            rec.update({f"{k}_median_ms": round(v["median"], 1), f"{k}_cpu_ms": round(v["cpu"], 1)})
        if args.json:
            print(json.dumps({**rec, "model": shape}), flush=True)
        else:
            fmt = lambda v, w, p=1: f"{v:>{w}.{p}f}" if v is not None else f"{'skipped':>{w}}"  # noqa: E731
            print(f"{seq:>6} {fmt(base_ms, 9)} {fmt(cat_ms, 9)} {fmt(research_ms, 12)} {fmt(cat_ms / base_ms, 9, 3)} "
                  f"{fmt(research_ms / cat_ms if research_ms else None, 8, 2)} "
                  f"{fmt(rec['cat_cpu_ms'] / rec['base_cpu_ms'], 13, 3)} "
                  f"{fmt(rec['research_cpu_ms'] / rec['cat_cpu_ms'] if research_ms else None, 12, 2)} "
                  f"{fmt(base_mb, 9)} {fmt(cat_mb, 9)} "
                  f"{fmt(research_mb, 12)}", flush=True)


if __name__ == "__main__":
    main()
