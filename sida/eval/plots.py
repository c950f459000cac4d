"""The report's figures: quality vs training images (log scale, one line per method, a band over
training seeds, the teacher's level) and training scalars (losses, discriminator accuracy).

Curves come from the runs' `metrics.jsonl` (the training monitor's quick FD/FID and the losses),
keyed by run and training seed. The x axis counts every image a method has trained on, including
the runs it started from (SiD2A continues after SiD; every run after the shared warm-up).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.atomic import atomic_write

__all__ = ["run_and_seed", "upstream_kimg", "curve_points", "seed_band", "plot_quality_vs_images", "plot_scalars"]

Curves = dict[str, dict["int | None", list[dict]]]   # run -> training seed -> jsonl records


def run_and_seed(path: str | Path) -> tuple[str, int | None]:
    """(run, training seed) of results/E/<run>/metrics.jsonl or results/E/seed<K>/<run>/metrics.jsonl."""
    p = Path(path)
    m = re.fullmatch(r"seed(\d+)", p.parent.parent.name)
    return p.parent.name, int(m.group(1)) if m else None


def upstream_kimg(runs: dict) -> dict[str, float]:
    """kimg trained before each run starts: the phases of every run it starts from (`init`,
    `init_generator`), transitively, each counted once."""
    total = {n: float(sum(p["kimg"] for p in r["phases"])) for n, r in runs.items()}

    def ancestors(name: str, seen: set[str]) -> set[str]:
        for key in ("init", "init_generator"):
            ref = runs[name].get(key)
            if ref and ref != "teacher" and ref in runs and ref not in seen:
                seen.add(ref)
                ancestors(ref, seen)
        return seen

    return {n: sum(total[a] for a in ancestors(n, set())) for n in runs}


def curve_points(records: list[dict], key: str) -> dict[float, float]:
    """{kimg: value} of the records that logged a finite `key` (monitor points, not progress ticks)."""
    return {float(r["kimg"]): float(r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "kimg" in r}


def seed_band(per_seed: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(kimg, mean, min, max) of `key` over training seeds at the kimg every seed logged; None
    when no seed logged it."""
    pts = [p for p in (curve_points(recs, key) for recs in per_seed.values()) if p]
    if not pts:
        return None
    xs = sorted(set.intersection(*(set(p) for p in pts)))
    if not xs:
        return None
    ys = np.array([[p[x] for x in xs] for p in pts])
    return np.array(xs), ys.mean(0), ys.min(0), ys.max(0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, curves: Curves, key: str, offsets: dict[str, float], colors: dict[str, str],
          names: dict[str, str] | None = None) -> bool:
    """A mean line per run (a min-max band over training seeds when there are several), named by
    `names` (the runs' labels, e.g. 'DMD2') where given."""
    drawn = False
    for run, per_seed in curves.items():
        band = seed_band(per_seed, key)
        if band is None:
            continue
        x, mean, lo, hi = band
        x = x + offsets.get(run, 0.0)
        n = len(per_seed)
        name = (names or {}).get(run, run)
        label = name if n == 1 else f"{name} (mean of {n} seeds, band min-max)"
        ax.plot(x, mean, color=colors[run], label=label, marker="." if len(x) < 30 else None)
        if n > 1:
            ax.fill_between(x, lo, hi, color=colors[run], alpha=0.2, lw=0)
        drawn = True
    return drawn


def _colors(runs: Sequence[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {r: palette[i % len(palette)] for i, r in enumerate(runs)}


def _save(fig, path: Path) -> None:
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_quality_vs_images(curves: Curves, keys: Sequence[str], offsets: dict[str, float], path: Path,
                           label: str, teacher: tuple[str, float] | None = None,
                           names: dict[str, str] | None = None) -> bool:
    """Monitor FD/FID vs training images, both axes log; the teacher's level (same protocol) as a
    dashed line. False (and no file) when no run logged any of `keys`."""
    key = next((k for k in keys if any(seed_band(ps, k) for ps in curves.values())), None)
    if key is None:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    _draw(ax, curves, key, offsets, _colors(list(curves)), names)
    if teacher is not None:
        ax.axhline(teacher[1], ls="--", c="black", lw=1.2, label=teacher[0])
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):  # 1, 2, 5, 10, 20, ... rather than 10^0, 10^1
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training images (kimg, including the runs a method starts from)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_scalars(curves: Curves, keys: Sequence[str], offsets: dict[str, float], path: Path, title: str) -> bool:
    """One panel per key that any run logged (linear axes). False when none was logged."""
    present = [k for k in keys if any(seed_band(ps, k) for ps in curves.values())]
    if not present:
        return False
    plt = _pyplot()
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colors = _colors(list(curves))
    for ax, k in zip(axes.flat, present):
        _draw(ax, curves, k, offsets, colors)
        if k.startswith("d_acc"):
            ax.axhline(0.5, ls=":", c="gray", lw=1)  # chance: a discriminator that separates nothing
        ax.set_xlabel("training images (kimg)")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


TEXT_SCORES = (("clip_score", "CLIP score (raw cosine)"), ("alignment", "prompt alignment (classifier reads the prompt's class)"))


def plot_quality_vs_text_score(rows: Sequence[dict], path: Path, label: str) -> bool:
    """Text-to-image models: FD/FID (y) against CLIP score or prompt alignment (x), one point per
    model with its standard errors, so a guidance sweep shows what a higher scale buys in
    alignment and costs in FD (SiD-LSG's figure). False (no file) when no row has such a score."""
    key, xlabel = next(((k, xl) for k, xl in TEXT_SCORES if any(r.get(k) for r in rows)), (None, None))
    points = [r for r in rows if key and r.get(key) and r.get("value")]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, color in zip(points, _colors([r["name"] for r in points]).values()):
        x, y = r[key], r["value"]
        ax.errorbar(x["mean"], y["mean"], xerr=x.get("se") or 0, yerr=y.get("se") or 0, fmt="o", c=color,
                    capsize=3, label=f"{r['label']} ({r['nfe']} NFE)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
