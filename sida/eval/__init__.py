"""Evaluation, by job: noise and labels per seed (`noise`), sampling (`sampling`), feature
networks (`features`, `digits_classifier`), sharded extraction (`extract`), reference statistics
(`refstats`), metrics, one network's evaluation (`evaluation`), the training monitor (`monitor`),
and the statistics and figures of the report (standard errors, paired differences, curves)."""
