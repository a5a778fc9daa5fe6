"""Evaluation: feature extraction, 10-fold verification, MegaFace-style identification, reports.

``evaluate_bins`` (in :mod:`hfsoftmax.eval.report`) is the entry point training uses.
"""
from hfsoftmax.eval.report import evaluate_bins
from hfsoftmax.eval.verification import evaluate

__all__ = ["evaluate_bins", "evaluate"]
