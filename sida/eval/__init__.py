"""Evaluation: feature extractors, metrics, reference statistics, sampling for grids."""
