"""Evaluation: batched (and ZeRO-3-synced) greedy generation, scorers, the training callback.
Returns results; never logs by itself (the engine hands them to tracking)."""

from cat_ds.evaluation.run import EvalResult, Prediction, run_eval, write_predictions
from cat_ds.evaluation.scorers import SCORERS, get_scorer

__all__ = ["EvalResult", "Prediction", "run_eval", "write_predictions", "SCORERS", "get_scorer"]
