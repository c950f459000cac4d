"""Evaluation: feature extractors, metrics, reference statistics, sampling for grids, and the
statistics and figures of the report (standard errors, paired differences, quality curves)."""
