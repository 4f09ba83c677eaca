"""Evaluation of a purification defense: metrics (Wilson intervals, worst-of-N, majority vote), data and classifier
sources, JSONL records with resume and sharding, the harness (``evaluate``) and its report."""

from .metrics import PROTOCOL_METRICS, Accuracy, majority_vote_correct, protocol_metrics, robust_curve, wilson_interval

__all__ = ["PROTOCOL_METRICS", "Accuracy", "majority_vote_correct", "protocol_metrics", "robust_curve",
           "wilson_interval"]
