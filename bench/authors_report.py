"""Every table of docs/authors-code.md, from the runs' files.

    python -m bench.authors_report --ours /work/exp/authors/ours/digits --theirs /work/exp/authors/theirs \
        --seeds 0,1,2 --seeds 0,1,2,3 --rampup /work/exp/authors/theirs_rampup

Reads, per training seed K (the layout of the commands in docs/authors-code.md):
  ours    OURS/seed<K>/sida/metrics.jsonl (the pipeline's sida run), OURS/evaluate/seed<K>/sida/metrics.json
  theirs  THEIRS/seed<K>/sida/metrics.jsonl (bench.authors_sida), THEIRS/seed<K>/sida/authors_run/sida/stats_*.jsonl
          (their loop's own losses), THEIRS/evaluate/seed<K>/sida-authors/metrics.json
and, with --rampup, RAMPUP/seed0/sida/metrics.jsonl and RAMPUP/evaluate/seed0/sida-authors/metrics.json.
Each --seeds set gives a results table (evaluate-stage FD, best quick-FD kimg, precision, recall,
Welch interval of authors - ours) and a quick-FD table at the monitor's evaluation points; the
first set also the per-seed curves and the mean losses. Quick-FD kimg count the shared warm-up
(--offset-kimg, default the default config's 2 kimg). Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from sida.errors import ConfigError, require_file
from sida.eval.stats import interval, welch_satterthwaite

Welch = tuple[float, list[float] | None, float | None, float | None]  # difference, interval, df, p


def _read_json(path: Path, made_by: str) -> dict:
    require_file(path, "run file", ConfigError, f"{made_by} writes it (docs/authors-code.md, commands to repeat)")
    return json.loads(path.read_text())


def _read_jsonl(path: Path, made_by: str) -> list[dict]:
    require_file(path, "run file", ConfigError, f"{made_by} writes it (docs/authors-code.md, commands to repeat)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Side:
    """One side's runs: quick-FD curves, losses and evaluations per training seed."""

    def __init__(self, name: str, root: Path, eval_name: str, made_by: str, offset_kimg: float) -> None:
        self.name, self.root, self.eval_name, self.made_by, self.offset = name, root, eval_name, made_by, offset_kimg

    def rows(self, seed: int) -> list[dict]:
        return [r for r in _read_jsonl(self.root / f"seed{seed}" / "sida" / "metrics.jsonl", self.made_by)
                if not any(k.startswith("final/") for k in r)]

    def curve(self, seed: int) -> dict[float, float]:
        """kimg (counting the shared warm-up, rounded to the image) -> quick FD."""
        return {round(r["kimg"] + self.offset, 3): r["fd"] for r in self.rows(seed) if r.get("fd") is not None}

    def evaluation(self, seed: int) -> dict:
        return _read_json(self.root / "evaluate" / f"seed{seed}" / self.eval_name / "metrics.json",
                          "the evaluate stage")

    def fd(self, seed: int) -> tuple[float, float | None]:
        m = self.evaluation(seed)
        s = m["summary"][m["metric"]]
        return s["mean"], s["se"]

    def loss_means(self, seed: int) -> dict[str, float]:
        """Per-iteration means over the run of the fake-score and discriminator losses."""
        if self.name == "ours":  # tick means, weighted by the images of each tick
            rows, out = self.rows(seed), {}
            for key in ("loss_fake", "loss_d"):
                prev, num, den = 0.0, 0.0, 0.0
                for r in rows:
                    if r.get(key) is not None:
                        w = r["kimg"] - prev
                        num, den = num + w * r[key], den + w
                    prev = r["kimg"]
                out[key] = num / den
            return out
        files = sorted((self.root / f"seed{seed}" / "sida" / "authors_run" / "sida").glob("stats_*.jsonl"))
        if not files:
            raise ConfigError(f"{self.root}/seed{seed}/sida/authors_run/sida has no stats_*.jsonl: "
                              f"bench.authors_sida writes it (their loop's own log)")
        stats = _read_jsonl(files[0], "their loop")
        out = {}
        for ours_key, key in (("loss_fake", "fake_score_Loss/loss"), ("loss_d", "D_Loss/loss")):
            parts = [(s[key]["num"], s[key]["mean"]) for s in stats if key in s]
            out[ours_key] = sum(n * m for n, m in parts) / sum(n for n, _ in parts)
        return out


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """mean(b) - mean(a), its Welch 95 % t interval, Welch-Satterthwaite df and two-sided p."""
    from scipy.stats import t

    d = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return d, None, None, None
    parts = [(statistics.stdev(x) / math.sqrt(len(x)), len(x) - 1) for x in (a, b)]
    se = math.sqrt(sum(s ** 2 for s, _ in parts))
    df = welch_satterthwaite(parts)
    p = None if df is None else float(2 * t.sf(abs(d) / se, df))
    return d, interval(d, se, df), df, p


def _ms(v: Sequence[float], digits: int = 2) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.{digits}f} ± {sd:.{digits}f}"


def _iv(w: Welch, digits: int = 2) -> str:
    return "n/a" if w[1] is None else f"[{w[1][0]:+.{digits}f}, {w[1][1]:+.{digits}f}]"


def _check_same_evaluation(ours: Side, theirs: Side, seeds: Sequence[int]) -> None:
    """Every evaluation used the same evaluation seeds (else the FDs are not comparable)."""
    ref = ours.evaluation(seeds[0])["seeds"]
    for side in (ours, theirs):
        for k in seeds:
            if side.evaluation(k)["seeds"] != ref:
                raise ConfigError(f"{side.name} seed {k} was evaluated on seeds {side.evaluation(k)['seeds']}, not "
                                  f"{ref}: evaluate every network with the same evaluate settings")


def results_table(ours: Side, theirs: Side, seeds: Sequence[int]) -> str:
    _check_same_evaluation(ours, theirs, seeds)
    lines = ["| side | seeds | FD per seed (± se of the evaluation) | mean ± std over seeds | "
             "best quick-FD kimg per seed | precision | recall |", "|---|---|---|---|---|---|---|"]
    fds = {}
    for side in (ours, theirs):
        per = [side.fd(k) for k in seeds]
        fds[side.name] = [m for m, _ in per]
        best = [min(side.curve(k).items(), key=lambda kv: kv[1])[0] for k in seeds]
        pr = {key: statistics.fmean(side.evaluation(k)["summary"][key]["mean"] for k in seeds)
              for key in ("precision", "recall")}
        cells = ", ".join(f"{m:.3f} ± {se:.3f}" if se is not None else f"{m:.3f}" for m, se in per)
        lines.append(f"| {side.name} | {', '.join(map(str, seeds))} | {cells} | **{_ms(fds[side.name], 3)}** | "
                     f"{', '.join(f'{b:g}' for b in best)} | {pr['precision']:.3f} | {pr['recall']:.3f} |")
    w = welch(fds[ours.name], fds[theirs.name])
    df = "n/a" if w[2] is None else f"{w[2]:.1f}"
    p = "n/a" if w[3] is None else f"{w[3]:.2f}"
    lines.append("")
    lines.append(f"**{theirs.name} − {ours.name}: {w[0]:+.2f} FD, Welch 95 % interval {_iv(w)}** (df {df}, p = {p})")
    return "\n".join(lines)


def quick_fd_table(ours: Side, theirs: Side, seeds: Sequence[int]) -> str:
    curves = {s.name: [s.curve(k) for k in seeds] for s in (ours, theirs)}
    points = sorted(set.intersection(*(set(c) for cs in curves.values() for c in cs)))
    phases = {round(r["kimg"] + ours.offset, 3): r.get("phase") for r in ours.rows(seeds[0])}
    lines = [f"| kimg (incl. the {ours.offset:g}k shared warm-up) | phase | {ours.name} mean ± std | "
             f"{theirs.name} mean ± std | {theirs.name} − {ours.name} | Welch 95 % |", "|---|---|---|---|---|---|"]
    for x in points:
        a, b = ([c[x] for c in curves[s.name]] for s in (ours, theirs))
        w = welch(a, b)
        lines.append(f"| {x:g} | {phases.get(x) or ''} | {_ms(a)} | {_ms(b)} | {w[0]:+.2f} | {_iv(w)} |")
    return "\n".join(lines)


def per_seed_curves(sides: Sequence[tuple[str, Side, int]]) -> str:
    """One line per (label, side, seed): kimg:quick FD."""
    width = max(len(label) for label, _, _ in sides)
    return "\n".join(f"{label:<{width}} {k}  " + " ".join(f"{x:g}:{v:.2f}" for x, v in side.curve(k).items())
                     for label, side, k in sides)


def losses_line(ours: Side, theirs: Side, seeds: Sequence[int]) -> str:
    o, t = ([s.loss_means(k) for k in seeds] for s in (ours, theirs))
    fmt = lambda rows, key: " / ".join(f"{r[key]:.2f}" for r in rows)
    return (f"fake-score loss {fmt(o, 'loss_fake')} ({ours.name}, seeds {', '.join(map(str, seeds))}) against "
            f"{fmt(t, 'loss_fake')} ({theirs.name}); discriminator loss {fmt(o, 'loss_d')} against {fmt(t, 'loss_d')}")


def report(a: argparse.Namespace) -> str:
    ours = Side("ours", a.ours, "sida", "the pipeline's sida run (snakemake)", a.offset_kimg)
    theirs = Side("authors", a.theirs, "sida-authors", "bench.authors_sida", a.offset_kimg)
    out = []
    for i, seeds in enumerate(a.seeds):
        out += [f"## Seeds {', '.join(map(str, seeds))}", "", results_table(ours, theirs, seeds), "",
                "Quick FD at the monitor's evaluation points:", "", quick_fd_table(ours, theirs, seeds), ""]
        if i == 0:
            out += ["Per seed (kimg: quick FD):", "", "```",
                    per_seed_curves([(s.name, s, k) for s in (ours, theirs) for k in seeds]), "```", "",
                    "Mean losses over the run: " + losses_line(ours, theirs, seeds), ""]
    if a.rampup is not None:
        ramp = Side("authors, ramp-up", a.rampup, "sida-authors",
                    "bench.authors_sida --set distill.ema_rampup_ratio=0.05", a.offset_kimg)
        m, se = ramp.fd(0)
        out += ["## Their loop with EMA ramp-up 0.05 (seed 0)", "", "```",
                per_seed_curves([("authors, ramp-up 0.05, seed", ramp, 0), ("authors, no ramp-up,   seed", theirs, 0)]),
                "```", "", f"Evaluate-stage FD of its best snapshot: {m:.3f} ± {se:.3f}", ""]
    return "\n".join(out)


def _seed_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a comma list of integers, not {s!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.authors_report", description=__doc__.split("\n")[0])
    p.add_argument("--ours", required=True, type=Path, help="our results for the experiment (results_dir/digits)")
    p.add_argument("--theirs", required=True, type=Path, help="bench.authors_sida's outputs, seed<K>/sida per seed")
    p.add_argument("--seeds", action="append", type=_seed_list, help="training seeds of one table (repeatable)")
    p.add_argument("--rampup", type=Path, help="their loop's run with ema_rampup_ratio 0.05 (seed 0)")
    p.add_argument("--offset-kimg", type=float, default=2.0, help="kimg of the shared warm-up before the sida run")
    a = p.parse_args(argv)
    a.seeds = a.seeds or [[0, 1, 2]]
    print(report(a))


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
