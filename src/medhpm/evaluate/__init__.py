"""Evaluation: per-organ Dice and HD95 (mm), result files and tables like the paper's Table 1."""

from .classes import BTCV8, BTCV13, display_name, parse_classes
from .metrics import CONVENTIONS, compute_case_metrics, summarize
from .run import evaluate_predictions
from .tables import aggregate_seeds, paper_table

__all__ = [
    "BTCV8",
    "BTCV13",
    "CONVENTIONS",
    "aggregate_seeds",
    "compute_case_metrics",
    "display_name",
    "evaluate_predictions",
    "paper_table",
    "parse_classes",
    "summarize",
]
