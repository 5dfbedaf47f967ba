"""One owner for the vocabulary of settings and the small rules several modules apply.
A leaf module (standard library only): the config (torch-free, read by the launcher), the loss,
the data generators and the CLI all import from here, so a word means one thing everywhere."""
from __future__ import annotations

LOSS_TYPES = ("div", "div2", "nll", "hinge")  # Re-Attention row loss (docs/METHOD.md section 3)
NORMALIZATIONS = ("micro", "global")  # CAT loss and LM loss: per micro-batch, or per optimizer step
AMPLITUDES = ("epoch", "step", "constant")  # exp(-decay x epoch) | exp(-decay x step/steps_per_epoch) | 1
GRANULARITIES = ("all", "layer", "head")  # where alpha applies: the average, each layer, each head
DTYPES = ("auto", "bf16", "fp32")
TOKENIZER_KINDS = ("bpe", "sentencepiece")
MODES = {"base": False, "cat": True}  # a recipe's two modes differ in cat.enabled only


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
