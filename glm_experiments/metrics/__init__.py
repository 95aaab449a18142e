"""Metrics of the field, each defined once (see DEFINITIONS, logged with every run)."""

from glm_experiments.metrics.text import DEFINITIONS, compute_metrics, score_sample

__all__ = ["DEFINITIONS", "compute_metrics", "score_sample"]
