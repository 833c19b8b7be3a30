"""Evaluation: metrics, embedding-space analysis and the report; `evaluate_model` is the entry point."""

from uue.evaluation.evaluate import add_evaluation_arguments, evaluate_model
from uue.evaluation.metrics import best_threshold, f1_at, mean_auc_within, retrieval_metrics, roc_auc

__all__ = ["add_evaluation_arguments", "best_threshold", "evaluate_model", "f1_at", "mean_auc_within",
           "retrieval_metrics", "roc_auc"]
