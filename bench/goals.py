"""Issue 33's speed and memory goals, read off one `bench.compare` run.

At the authors' precision (fp32 variants only), against the authors' loop in the same run:
a one-process variant must reach 1.0x their median img/s and a two-process variant 1.5x, each
holding at most 0.8x their peak memory (per process); the verdict names, per layout, the fastest
variant that meets both, else the fastest. A run that lacks one of the two layouts, or the
memory pass, says so instead of a verdict.
"""

from __future__ import annotations

from typing import TextIO

GOALS = {1: 1.0, 2: 1.5}  # processes -> img/s ratio to the authors' loop
MEMORY_GOAL = 0.8  # peak memory per process, ratio to the authors' loop


def _precision(name: str) -> str:
    """A contestant's precision, read by `bench.compare`'s own variant parser (imported here, not
    at the top: bench.compare imports this module)."""
    from bench.compare import parse_variant

    return parse_variant(name.removeprefix("ours-"))["precision"]


def verdict(rows: dict[str, dict]) -> list[dict]:
    """One entry per layout of `GOALS`: {procs, goal, variant, speedup, memory, met} for the
    fastest variant that meets both goals, else the fastest; `variant` None when the run had no
    fp32 variant with that many processes (then `met` is None), `memory` None without a memory
    pass (`met` then judges the speed alone)."""
    out = []
    for procs, goal in GOALS.items():
        mine = {n: r for n, r in rows.items()
                if n != "authors" and r["procs"] == procs and _precision(n) == "fp32"}
        if not mine:
            out.append({"procs": procs, "goal": goal, "variant": None, "speedup": None, "memory": None, "met": None})
            continue
        judged = [{"procs": procs, "goal": goal, "variant": n, "speedup": r["speedup_vs_authors"],
                   "memory": r.get("peak_memory_vs_authors")} for n, r in mine.items()]
        for e in judged:
            e["met"] = e["speedup"] >= goal and (e["memory"] is None or e["memory"] <= MEMORY_GOAL)
        out.append(max(judged, key=lambda e: (e["met"], e["speedup"])))  # the fastest that meets both, else the fastest
    return out


def verdict_lines(entries: list[dict]) -> list[str]:
    """The verdict as printed lines, one per layout."""
    lines = []
    for e in entries:
        head = f"goal, {e['procs']} process{'es' if e['procs'] > 1 else ''}, fp32: >= {e['goal']:.2f}x authors"
        if e["variant"] is None:
            lines.append(f"{head}, memory <= {MEMORY_GOAL:.2f}x: no fp32 variant with {e['procs']} process(es) in this run")
            continue
        mem = (f", memory {e['memory']:.2f}x (<= {MEMORY_GOAL:.2f}x)" if e["memory"] is not None
               else " (no memory pass: speed only)")
        lines.append(f"{head}: {e['variant']} {e['speedup']:.2f}x{mem}: {'met' if e['met'] else 'NOT met'}")
    return lines


def print_verdict(rows: dict[str, dict], out: TextIO) -> list[dict]:
    """Print the verdict of a run's `rows` to `out`; return its entries (for the run's JSON)."""
    entries = verdict(rows)
    print("\n".join(verdict_lines(entries)), file=out)
    return entries
