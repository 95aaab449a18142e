"""Metrics of the field, each defined once (see DEFINITIONS and CONVENTIONS, logged with every run)."""

from glm_experiments.metrics.text import (
    CONVENTION_SOURCES,
    CONVENTIONS,
    DEFAULT_CONVENTION,
    DEFINITIONS,
    compute_metrics,
    definitions,
    score_sample,
)

__all__ = ["CONVENTIONS", "CONVENTION_SOURCES", "DEFAULT_CONVENTION", "DEFINITIONS", "compute_metrics", "definitions",
           "score_sample"]
