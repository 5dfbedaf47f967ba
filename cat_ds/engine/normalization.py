"""How each micro-batch's loss is scaled so the optimizer step gets the normalisation asked for
(`train.lm_normalization`, `cat.normalization`). The one explanation; the trainer applies it.

DeepSpeed divides every micro-batch loss by grad_accum and averages gradients over the ranks: the
step's gradient is that of sum(micro-batch losses) / (grad_accum x world), `average` below.
- "micro": each micro-batch loss is its own mean (per answer token, per CAT row); the step is the
  mean of those means, so it depends on how the step is split (the research code's behaviour).
- "global": the term is this micro-batch's sum divided by the count over the WHOLE step (every
  micro-batch of every rank, all-reduced before the first forward), then multiplied by `average`,
  so DeepSpeed's averaging yields exactly the gradient of step sum / step count, whatever the split.
  The LM loss gets this through transformers' `num_items_in_batch` = count / average; the CAT loss
  (`reattention_loss(..., denominator=count)`) is multiplied by `average` here.
The logged losses are each micro-batch's share of the step's value (`*_share`), summed over the
step's micro-batches and all-reduced over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossScale:
    average: int  # grad_accum x world: what DeepSpeed divides the step's summed losses by

    @classmethod
    def of(cls, grad_accum: int, world_size: int) -> "LossScale":
        return cls(grad_accum * world_size)

    def lm_items(self, step_tokens: float) -> float:
        """`num_items_in_batch` for a "global" LM loss: the step's answer tokens / average (at least 1 token)."""
        return max(step_tokens, 1.0) / self.average

    def cat_backward_factor(self, normalization: str) -> float:
        """What the CAT loss is multiplied by before DeepSpeed's averaging."""
        return self.average if normalization == "global" else 1.0

    def lm_share(self, lm_loss):
        """This micro-batch's share of the step's LM loss (either normalisation: see above)."""
        return lm_loss / self.average

    def cat_share(self, cat_loss, normalization: str):
        """This micro-batch's share of the step's CAT loss: a "global" term already is one."""
        return cat_loss / (1.0 if normalization == "global" else self.average)
