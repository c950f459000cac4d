"""An experiment's evaluations as a table and as paired comparisons (the report's content as data).

Input: the `metrics.json` of every evaluation (the teacher once; each distillation run once, or
once per training seed). A *model* is a name (teacher, sid, ...) with one evaluation per training
seed. Every number carries its uncertainty:

- one training seed: the mean over evaluation runs ± its standard error over those runs;
- several training seeds: the mean over seeds, the std over seeds (training-seed variation) and,
  next to it, the evaluation's own standard error of one network (RMS over seeds).

Comparisons are paired differences with a 95 % t interval (`sida.eval.stats.paired_difference`):
over evaluation runs (the same seeds, so sampling noise common to both cancels) when neither model
has training seeds; over training seeds (per-seed means, paired by seed) when both have; a student
with seeds against a single teacher adds the teacher's evaluation error in quadrature. A difference
is called one only when its interval excludes zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .stats import paired_difference, summarize

__all__ = ["Model", "group_models", "metric_stat", "model_row", "results_rows", "comparisons",
           "evaluation_spread", "LOWER_IS_BETTER", "PAIRED_KEYS"]

LOWER_IS_BETTER = {"fd", "fid"}
# alignment: text networks on class-labelled data, the share of samples read as their prompt's class;
# clip_score: text networks on COCO captions (zero-shot), the mean raw CLIP cosine of a run
SUMMARY_KEYS = ("is", "precision", "recall", "alignment", "clip_score")
# compared between models beside the main metric, when both were scored with it (higher is better)
PAIRED_KEYS = ("clip_score",)


@dataclass
class Model:
    """One model's evaluations, by training seed (None: no training seeds)."""

    name: str
    kind: str
    evals: dict[int | None, dict] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int | None]:
        return sorted(self.evals, key=lambda s: -1 if s is None else s)

    @property
    def first(self) -> dict:
        return self.evals[self.seeds[0]]

    @property
    def has_seeds(self) -> bool:
        return self.seeds != [None]

    @property
    def label(self) -> str:
        """The model's name in the report: its evaluation's `label` (e.g. 'ADD (4 steps)'),
        else its name (older metrics.json files have none)."""
        return self.first.get("label") or self.name


def group_models(evaluations: list[dict]) -> list[Model]:
    """Evaluations grouped by model name; the teacher first, then students by name."""
    models: dict[str, Model] = {}
    for m in evaluations:
        model = models.setdefault(m["name"], Model(m["name"], m["kind"]))
        seed = m.get("train_seed")
        if seed in model.evals:
            raise ValueError(f"two evaluations of {m['name']} with training seed {seed}: pass each metrics.json once")
        model.evals[seed] = m
        if None in model.evals and len(model.evals) > 1:
            # e.g. an unseeded run's evaluation left beside a seeded sweep's: a mean over both would mix protocols
            raise ValueError(f"{m['name']} has evaluations with and without a training seed: pass only one "
                             "kind (evaluate/<run>/ or evaluate/seed<k>/<run>/)")
    return sorted(models.values(), key=lambda md: (md.kind != "teacher", md.name))


def _eval_stat(m: dict, key: str) -> dict | None:
    """The evaluation summary of `key` in one metrics.json, with its se (older files: from values)."""
    s = (m.get("summary") or {}).get(key)
    if not s:
        return None
    return s if "se" in s else summarize(s["values"])


def metric_stat(model: Model, key: str) -> dict | None:
    """`key` over the model's evaluations.

    {'mean', 'se', 'eval_se', 'eval_std', 'n_runs', 'seeds' (None or the training seeds),
    'seed_std', 'per_seed' ({seed: mean})}. One training seed: mean and se over evaluation runs
    (se is eval_se). Several: the mean over seeds, se = seed_std / sqrt(seeds), and eval_se the
    RMS of the per-network evaluation standard errors.
    """
    per = {s: _eval_stat(m, key) for s, m in model.evals.items()}
    if any(v is None for v in per.values()):
        return None
    ses = [v["se"] for v in per.values() if v["se"] is not None]
    eval_se = math.sqrt(sum(x * x for x in ses) / len(ses)) if ses else None
    eval_std = math.sqrt(sum(v["std"] ** 2 for v in per.values()) / len(per))
    n_runs = min(v["n"] for v in per.values())
    if not model.has_seeds:
        v = per[None]
        return {"mean": v["mean"], "se": v["se"], "eval_se": v["se"], "eval_std": v["std"], "n_runs": v["n"],
                "seeds": None, "seed_std": None, "per_seed": None}
    seeds = model.seeds
    across = summarize([per[s]["mean"] for s in seeds])
    return {"mean": across["mean"], "se": across["se"], "eval_se": eval_se, "eval_std": eval_std, "n_runs": n_runs,
            "seeds": seeds, "seed_std": across["std"] if len(seeds) > 1 else None,
            "per_seed": {str(s): per[s]["mean"] for s in seeds}}


def _monitor_value(model: Model, key: str) -> float | None:
    """The model's FD/FID under the training monitor's protocol (mean over training seeds)."""
    vals = [(e.get("monitor") or {}).get(key) for e in model.evals.values()]
    return None if not vals or None in vals else sum(vals) / len(vals)


def model_row(model: Model) -> dict:
    """The results-table row of a model (JSON-able)."""
    m = model.first
    key = m["metric"]
    return {"name": model.name, "label": model.label, "kind": model.kind, "nfe": m["nfe"], "steps": m.get("steps"),
            "metric": key,
            "metric_label": m["metric_label"], "value": metric_stat(model, key),
            **{k: metric_stat(model, k) for k in SUMMARY_KEYS},
            "extra": [{"metric": x["metric"], "metric_label": x["metric_label"], "value": metric_stat(model, x["metric"])}
                      for x in m.get("extra_metrics") or []],
            "monitor": _monitor_value(model, key),
            "labels": m.get("labels", "random"), "latents": m.get("latents", "iid"),
            "num_runs": m["num_runs"], "num_samples": m["num_samples"],
            "train_seeds": None if not model.has_seeds else model.seeds,
            "extractor": m["extractor"]["name"], "extractor_sha256": m["extractor"]["sha256"], "mode": m["mode"],
            "reference_sha256": m["reference"]["sha256"]}


def results_rows(models: list[Model]) -> list[dict]:
    """One row per model, teacher first."""
    return [model_row(md) for md in models]


def _same_protocol(a: dict, b: dict) -> str | None:
    """Why two evaluations cannot be paired over runs (None when they can)."""
    default = {"latents": "iid"}  # (metrics written before the option existed)
    for k in ("seeds", "num_samples", "metric", "labels", "latents"):
        if a.get(k, default.get(k)) != b.get(k, default.get(k)):
            return f"different evaluation {k}"
    if a["reference"]["sha256"] != b["reference"]["sha256"]:
        return "different reference statistics"
    return None


def _pair(a: Model, b: Model, key: str, level: float) -> dict:
    """Paired difference a - b of `key` (see the module docstring for the pairing)."""
    if not a.has_seeds and not b.has_seeds:
        why = _same_protocol(a.first, b.first)
        if why:
            return {"unit": None, "note": why}
        va, vb = _eval_stat(a.first, key)["values"], _eval_stat(b.first, key)["values"]
        return {"unit": "evaluation runs", **paired_difference(va, vb, level)}
    if a.has_seeds and b.has_seeds:
        common = [s for s in a.seeds if s in b.evals]
        if len(common) < 2:
            return {"unit": None, "note": "fewer than 2 training seeds in common"}
        va = [_eval_stat(a.evals[s], key)["mean"] for s in common]
        vb = [_eval_stat(b.evals[s], key)["mean"] for s in common]
        return {"unit": "training seeds", **paired_difference(va, vb, level)}
    # One side is a single network (the teacher): per-seed differences, plus its evaluation error.
    seeded, single, sign = (a, b, 1.0) if a.has_seeds else (b, a, -1.0)
    vs = [_eval_stat(seeded.evals[s], key)["mean"] for s in seeded.seeds]
    st = _eval_stat(single.first, key)
    extra = [(st["se"], st["n"] - 1)] if st["se"] is not None else []
    d = paired_difference(vs, [st["mean"]], level, extra=extra)
    if sign < 0:
        d["mean"] = -d["mean"]
        d["ci"] = None if d["ci"] is None else [-d["ci"][1], -d["ci"][0]]
    return {"unit": "training seeds (+ the single network's evaluation error)", **d}


def _verdict(a: str, b: str, d: dict, key: str) -> str:
    if d.get("unit") is None:
        return f"not compared: {d['note']}"
    if d["ci"] is None:
        return "no interval (one value): not compared"
    if not d["significant"]:
        return "no difference detected (the interval contains 0)"
    lower = key in LOWER_IS_BETTER
    better = a if (d["mean"] < 0) == lower else b
    return f"{better} is better"


def comparisons(models: list[Model], level: float = 0.95) -> list[dict]:
    """Paired differences (later model - earlier model) of the main metric for every pair of
    models, in table order (so students are compared with the teacher first); then of each of
    `PAIRED_KEYS` that both models were scored with."""
    out = []
    for i, base in enumerate(models):
        for other in models[i + 1:]:
            key = base.first["metric"]
            if other.first["metric"] != key:
                continue
            for k in [key] + [k for k in PAIRED_KEYS if metric_stat(base, k) and metric_stat(other, k)]:
                d = _pair(other, base, k, level)
                out.append({"a": other.name, "b": base.name, "a_label": other.label, "b_label": base.label,
                            "metric": k, **d, "verdict": _verdict(other.label, base.label, d, k)})
    return out


def evaluation_spread(models: list[Model]) -> dict | None:
    """The evaluation's own spread on the teacher (one network): std and se over evaluation runs,
    absolute and relative to its mean; and under 'models' every model's std over the runs of one
    network (its first training seed's), relative to its own mean and to the teacher's."""
    teacher = next((md for md in models if md.kind == "teacher"), None)
    if teacher is None:
        return None
    st = _eval_stat(teacher.first, teacher.first["metric"])
    if st is None or st["n"] < 2:
        return None
    mean = st["mean"]
    per_model = []
    for md in models:
        ms = _eval_stat(md.first, teacher.first["metric"]) if md.first["metric"] == teacher.first["metric"] else None
        if ms is not None and ms["n"] >= 2:
            per_model.append({"model": md.name, "label": md.label, "std": ms["std"], "n_runs": ms["n"],
                              "relative_own": ms["std"] / ms["mean"] if ms["mean"] else None,
                              "relative_teacher": ms["std"] / mean if mean else None})
    return {"model": teacher.name, "metric": teacher.first["metric"], "mean": mean, "std": st["std"], "se": st["se"],
            "n_runs": st["n"], "relative_std": st["std"] / mean if mean else None,
            "relative_se": st["se"] / mean if mean else None, "models": per_model}
