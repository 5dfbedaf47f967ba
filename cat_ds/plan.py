"""`cat-ds plan`: will this run fit, per GPU, under each ZeRO option, before it goes to a cluster?

Model states (parameters, gradients, optimizer states) come from DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, additional
buffer factor 1.5 as theirs), fed with the model's parameter count and largest layer, counted on
the meta device (nothing is allocated, so a 70B config plans as fast as a 135M one). DeepSpeed's
estimators assume 16-bit weights with fp32 master weights and Adam (18 bytes per parameter).

Activations per GPU, our estimate for one micro-batch (bytes per element b: 2 for bf16, 4 for fp32):
- without activation checkpointing, per layer ~34 x micro x T x hidden x b / 2 (Korthikanti et
  al. 2022, "Reducing Activation Recomputation", with the T x T scores never stored: SDPA/flash);
- with it, every layer's input (micro x T x hidden x b) plus one layer recomputed in full;
- the logits at answer positions in fp32 for the loss, bounded here by micro x T x vocab x 4.
CAT's extra: per supervised row, selected head and layer, the row's attention probabilities
over its prefix are kept for the backward (micro x rows x heads x layers x T x 4 bytes; rows
per sample measured on the data when the tokenizer is at hand).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024 ** 3
# Architectures (config.json, no weights) of the shipped recipes' hub models, named org--name.json:
# planning a recipe needs no network.
MODELS_DIR = Path(__file__).resolve().parent / "configs" / "models"


@dataclass
class Option:
    name: str
    gpu: int  # bytes per GPU
    cpu: int  # bytes per node (DeepSpeed's estimate of the host memory it needs)


def count_params(model_config) -> tuple[int, int]:
    """(total parameters, largest layer's parameters), tied weights counted once, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_states(total: int, largest: int, nodes: int, gpus: int) -> list[Option]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    out = []
    for off in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=off)
        out.append(Option("zero2" + ("+offload optimizer" if off else ""), gpu, cpu))
    for off, off_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=off,
                                                            cpu_offload_params=off_params)
        name = "zero3" + ("+offload optimizer" if off else "") + ("+params" if off_params else "")
        out.append(Option(name, gpu, cpu))
    return out


def activations(mcfg, micro: int, seq: int, bytes_per: int, checkpointing: bool) -> int:
    h, layers, vocab = mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.vocab_size
    per_layer = 34 * micro * seq * h * bytes_per // 2
    body = layers * micro * seq * h * bytes_per + per_layer if checkpointing else layers * per_layer
    return body + micro * seq * vocab * 4


def cat_extra(mcfg, micro: int, seq: int, rows: float, heads: int, layers: int) -> int:
    return int(micro * rows * heads * layers * seq * 4)


def _hub_id(cfg) -> str | None:
    """model.name_or_path when it is a hub id (not a local path, not a named GGUF)."""
    from cat_ds.sources import NAMED

    spec = cfg.model.name_or_path
    if not spec or spec in NAMED or Path(spec).expanduser().exists() or spec.endswith(".gguf"):
        return None
    return spec


def cached_snapshot(repo_id: str) -> str | None:
    """The local Hugging Face cache's copy of a hub repo, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (or not a valid id): the caller falls back
        return None


def architecture(cfg):
    """The model's transformers config, offline first: model.config or a local model as the run
    would load it; a hub id from the local HF cache; else the shipped configs/models/<org>--<name>.json
    (or <named model>.json, before its GGUF is converted); else the hub."""
    from transformers import AutoConfig

    from cat_ds.config import ConfigError
    from cat_ds.engine.model import load_model_config

    spec, hub = cfg.model.name_or_path, _hub_id(cfg)
    shipped = MODELS_DIR / (spec.replace("/", "--") + ".json") if spec else None
    if hub:
        snap = cached_snapshot(hub)
        if snap and Path(snap, "config.json").is_file():
            return AutoConfig.from_pretrained(snap)
    else:
        try:
            return load_model_config(cfg)
        except ConfigError:
            if shipped is None or not shipped.is_file():
                raise
    if shipped is not None and shipped.is_file():
        return AutoConfig.for_model(**json.loads(shipped.read_text(encoding="utf-8")))
    return load_model_config(cfg)


def run_schedule(cfg, world_size: int):
    """(Schedule, None), or (None, why) when the training records cannot be counted."""
    from cat_ds.config import ConfigError
    from cat_ds.engine.preflight import check_data
    from cat_ds.schedule import schedule

    try:
        return schedule(cfg, world_size, check_data(cfg)), None
    except ConfigError as e:
        return None, str(e).splitlines()[0]


def supervised_rows(cfg, limit: int = 64) -> float | None:
    """Mean supervised rows per training record (first `limit`), or None without data/tokenizer."""
    try:
        from cat_ds.data.records import load_records
        from cat_ds.data.spans import tokenize_example
        from cat_ds.data.tokenizers import load_tokenizer
        from cat_ds.engine.model import model_source

        hub = None if cfg.model.tokenizer else _hub_id(cfg)
        src = cfg.model.tokenizer or (cached_snapshot(hub) if hub else model_source(cfg))
        if src is None:  # a hub model not in the local cache: no network (nor GGUF conversion) for a plan
            return None
        tok = load_tokenizer(src)
        recs = load_records(cfg.data.train, columns=cfg.data.columns)[:limit]
        return sum(len(tokenize_example(r, tok, cfg.data.max_length).rows) for r in recs) / max(1, len(recs))
    except Exception:  # no data yet, no tokenizer offline: the caller assumes a default
        return None


def schedule_lines(cfg, sched, why: str | None = None) -> list[str]:
    """The schedule (cat_ds/schedule.py) and its verdict, as `plan` prints them."""
    from cat_ds.schedule import schedule_problems

    if sched is None:
        return [f"schedule: unknown ({why})"]
    problems = schedule_problems(sched, cfg)
    return [f"schedule: {sched.describe()}",
            "schedule verdict: " + ("ok" if not problems else "refused: " + "; ".join(problems))]


def plan(cfg, nodes: int, gpus_per_node: int, gpu_gib: float, cpu_gib: float, rows: float | None = None,
         sched=None, sched_why: str | None = None) -> str:
    from cat_ds.reattention.selection import parse_heads, parse_layers

    if sched is None and sched_why is None:
        sched, sched_why = run_schedule(cfg, nodes * gpus_per_node)
    mcfg = architecture(cfg)
    total, largest = count_params(mcfg)
    bytes_per = 4 if cfg.model.dtype == "fp32" else 2  # auto: bf16 on the GPUs this plans for
    micro, seq = cfg.train.micro_batch_size, cfg.data.max_length
    act = activations(mcfg, micro, seq, bytes_per, cfg.model.gradient_checkpointing)
    extra, rows_note = 0, ""
    if cfg.cat.enabled:
        measured = rows if rows is not None else supervised_rows(cfg)
        rows_used = measured if measured is not None else 16.0
        rows_note = f"{rows_used:.1f} supervised rows per record ({'measured' if measured is not None else 'assumed'})"
        heads = parse_heads(cfg.cat.heads, mcfg.num_attention_heads) or mcfg.num_attention_heads
        layers = len(parse_layers(cfg.cat.layers, mcfg.num_hidden_layers))
        extra = cat_extra(mcfg, micro, seq, rows_used, heads, layers)
    lines = [f"model: {total:,} parameters (largest layer {largest:,}); {nodes} node(s) x {gpus_per_node} GPU(s), "
             f"{gpu_gib:g} GiB per GPU, {cpu_gib:g} GiB host memory per node",
             f"per GPU: activations {act / GIB:.2f} GiB (micro-batch {micro}, length {seq}, "
             f"{'bf16' if bytes_per == 2 else 'fp32'}, checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'})"
             + (f"; CAT recompute {extra / GIB:.2f} GiB ({rows_note})" if cfg.cat.enabled else ""),
             *schedule_lines(cfg, sched, sched_why),
             "", "| option | model states per GPU | + activations, CAT | host memory per node | verdict |",
             "|---|---|---|---|---|"]
    for o in model_states(total, largest, nodes, gpus_per_node):
        need = o.gpu + act + extra
        fits = need <= 0.9 * gpu_gib * GIB and o.cpu <= 0.9 * cpu_gib * GIB
        why = "fits" if fits else ("GPU memory" if need > 0.9 * gpu_gib * GIB else "host memory")
        lines.append(f"| {o.name} | {o.gpu / GIB:.2f} GiB | {need / GIB:.2f} GiB | {o.cpu / GIB:.2f} GiB | "
                     f"{'fits' if fits else 'too large: ' + why} |")
    lines.append("\n(model states: DeepSpeed's estimators, buffer factor 1.5; a verdict keeps 10 % headroom)")
    return "\n".join(lines)

