"""Evaluation: batched (and ZeRO-3-synced) greedy generation, scorers, the training callback,
attention probe. Returns results; never logs by itself (the engine hands them to tracking)."""

from cat_ds.evaluation.callback import EvalOutput, Evaluator
from cat_ds.evaluation.run import EvalResult, Prediction, run_eval, write_predictions
from cat_ds.evaluation.scorers import SCORERS, get_scorer

__all__ = ["EvalOutput", "Evaluator", "EvalResult", "Prediction", "run_eval", "write_predictions", "SCORERS",
           "get_scorer"]
