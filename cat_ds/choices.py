"""One owner for the vocabulary of settings and the small rules several modules apply.
A leaf module (standard library only): the config (torch-free, read by the launcher), the loss,
the data generators and the CLI all import from here, so a word means one thing everywhere."""
from __future__ import annotations

LOSS_TYPES = ("div", "div2", "nll", "hinge")  # Re-Attention row loss (docs/METHOD.md section 3)
NORMALIZATIONS = ("micro", "global")  # CAT loss and LM loss: per micro-batch, or per optimizer step
AMPLITUDES = ("epoch", "step", "constant")  # exp(-decay x epoch) | exp(-decay x step/steps_per_epoch) | 1
GRANULARITIES = ("all", "layer", "head")  # where alpha applies: the average, each layer, each head
DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")  # CAT_DS_DEVICE (cat_ds/engine/device.py): where the ranks train
TOKENIZER_KINDS = ("bpe", "sentencepiece")
SCORER_NAMES = ("exact", "gsm8k", "numeric")  # eval.scorer: the keys of cat_ds.evaluation.scorers.SCORERS
MODES = {"base": False, "cat": True}  # a recipe's two modes differ in cat.enabled only


def parse_layers(spec, num_layers: int | None = None) -> list[int]:
    """`cat.layers` as sorted unique indices: "all", "last N", a list of ints (negative counts from
    the end) or a comma/space-separated string. `num_layers` None (the config, before any model):
    checks the form only. ValueError names what is wrong."""
    known = num_layers is not None
    if spec is None or spec == "all":
        return list(range(num_layers or 0))
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("last"):
            n_txt = s[4:].strip(" :=")
            if not n_txt.isdigit() or int(n_txt) < 1 or known and int(n_txt) > num_layers:
                raise ValueError(f"layers: 'last N' needs 1 <= N{f' <= {num_layers}' if known else ''}, got {spec!r}")
            return list(range(num_layers - int(n_txt), num_layers)) if known else []
        try:
            spec = [int(x) for x in s.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"layers: expected 'all', 'last N' or a list of ints, got {spec!r}") from None
    if isinstance(spec, int):
        spec = [spec]
    out = set()
    for i in spec:
        j = int(i) + num_layers if known and int(i) < 0 else int(i)
        if known and not 0 <= j < num_layers:
            raise ValueError(f"layers: index {i} out of range for a model with {num_layers} layers")
        out.add(j)
    if not out:
        raise ValueError("layers: empty selection")
    return sorted(out)


def parse_heads(spec, num_heads: int | None = None) -> int | None:
    """`cat.heads`: "all"/None -> None (all heads); K -> K, or None when K is every head.
    `num_heads` None (the config, before any model): checks the form only."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, bool):
        raise ValueError(f"heads: expected 'all' or an int K, got {spec!r}")
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"heads: expected 'all' or an int K, got {spec!r}") from None
    if k < 1 or num_heads is not None and k > num_heads:
        raise ValueError(f"heads: K must be in [1, {num_heads if num_heads is not None else 'heads'}], got {k}")
    return None if k == num_heads else k


def uses_bf16(dtype: str, on_gpu: bool) -> bool:
    """Model and DeepSpeed precision: bf16 on GPU unless fp32 is asked for; fp32 on CPU (DeepSpeed
    has no fp16 there, and these CPUs have no bf16 units) unless bf16 is asked for."""
    return dtype == "bf16" or (dtype == "auto" and on_gpu)


def attention_ratio(a1, a0):
    """The causal / non-causal attention ratio: mean attention per causal column over mean per other
    column (a1 / a0). The loss compares it with alpha; the probe and the logs report it."""
    return a1 / a0


# STG's spurious twins (docs/METHOD.md section 4): twin -> (its causal item, factor); value int(factor x cause).
STG_TWINS = {"Yellow fingers": ("Smoking", 1.5), "Clothing size": ("Weight", 1.0), "Hormones": ("Exercise", 0.5)}


def stg_twin_value(cause_value: int, factor: float) -> int:
    return int(factor * cause_value)
