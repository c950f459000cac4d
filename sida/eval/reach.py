"""Training images each method needs to reach a quality level: the report's speed comparison.

The SiDA paper's second claim is about speed ("rapidly surpassing the teacher"): a method that
reaches a given FD with fewer training images converges faster. This module reads that off the
training monitor's curves (`metrics.jsonl`: the quick FD every `every_kimg`, on the monitor's
own sample count) as the first logged point at or below a threshold, counted in *all* images
a method trained on (the runs it started from included, as the report's curve plot counts them).

Default threshold: the teacher's FD under the monitor's protocol (its first `num_samples`
evaluation samples; `evaluate.during_training.reach_threshold` sets another). A run that never
reaches it within its schedule is *censored*: it is reported as "not reached", and a paired
difference over training seeds is formed only from the seeds where both runs reached it (with the
count of those seeds stated), because filling in a censored value would invent a number.
"""

from __future__ import annotations

from .plots import curve_points
from .stats import paired_difference, summarize

__all__ = ["first_reach", "reach_summary"]


def first_reach(records: list[dict], key: str, threshold: float, offset_kimg: float = 0.0) -> float | None:
    """Total kimg (`offset_kimg` + the run's own kimg) of the first record whose `key` is
    <= `threshold`; None when no record reaches it. Records without a finite `key` are skipped
    (progress ticks between monitor evaluations), as the report's curves skip them."""
    hits = [k for k, v in curve_points(records, key).items() if v <= threshold]
    return offset_kimg + min(hits) if hits else None


def reach_summary(curves: dict[str, dict[int | None, list[dict]]], key: str, threshold: float,
                  offsets: dict[str, float], level: float = 0.95) -> dict:
    """Images to reach `threshold` per run and training seed, and paired differences.

    `curves`: run -> training seed -> metrics.jsonl records; `offsets`: kimg trained before each
    run (see `sida.eval.plots.upstream_kimg`). Returns {'threshold', 'metric', 'runs': [{'run',
    'per_seed' ({seed: kimg or None}), 'reached' (count), 'seeds' (count), 'mean', 'std'} ...],
    'comparisons': [{'a', 'b', 'n', 'mean', 'ci', 'significant', 'note'} ...]}. `mean`/`std` are
    over the seeds that reached the threshold (None when none did); a comparison a - b pairs the
    seeds where both reached it and says how many seeds it dropped.
    """
    runs, per = [], {}
    for run in sorted(curves):
        seeds = curves[run]
        if not any(isinstance(r.get(key), (int, float)) for recs in seeds.values() for r in recs):
            continue  # a run without monitor evaluations (the shared fake-score warm-up)
        hits = {s: first_reach(recs, key, threshold, offsets.get(run, 0.0)) for s, recs in seeds.items()}
        per[run] = hits
        got = [v for v in hits.values() if v is not None]
        stat = summarize(got) if got else None
        runs.append({"run": run, "per_seed": {("-" if s is None else str(s)): v for s, v in sorted(
                        hits.items(), key=lambda kv: -1 if kv[0] is None else kv[0])},
                     "reached": len(got), "seeds": len(hits),
                     "mean": None if stat is None else stat["mean"],
                     "std": None if stat is None or len(got) < 2 else stat["std"]})
    comps = []
    names = [r["run"] for r in runs]
    for i, b in enumerate(names):
        for a in names[i + 1:]:
            common = sorted(s for s in per[a] if s in per[b] and per[a][s] is not None and per[b][s] is not None)
            dropped = len(set(per[a]) | set(per[b])) - len(common)
            note = f"{dropped} seed(s) where one did not reach it left out" if dropped else ""
            if len(common) < 2:
                comps.append({"a": a, "b": b, "n": len(common), "mean": None, "ci": None, "significant": False,
                              "note": note or "fewer than 2 seeds"})
                continue
            d = paired_difference([per[a][s] for s in common], [per[b][s] for s in common], level)
            comps.append({"a": a, "b": b, "n": d["n"], "mean": d["mean"], "ci": d["ci"],
                          "significant": d["significant"], "note": note})
    return {"threshold": threshold, "metric": key, "runs": runs, "comparisons": comps}
