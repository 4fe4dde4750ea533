"""Evaluation reports: a JSON document (metrics, recall@K curves, rank histograms, a similarity
sample, the modality gap) and its PNG plots, written by ``tvr eval`` and logged to MLflow."""

from tvr_platform.report.core import (
    REPORT_SCHEMA,
    build_report,
    global_embeddings,
    modality_gap,
    pca_2d,
    rank_histogram,
    recall_curve,
    sample_similarity,
)
from tvr_platform.report.plots import write_plots

__all__ = ["REPORT_SCHEMA", "build_report", "global_embeddings", "modality_gap", "pca_2d", "rank_histogram",
           "recall_curve", "sample_similarity", "write_plots"]
