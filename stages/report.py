"""Stage `report`: one page per experiment with the results table, training curves and samples.

    python -m stages.report --config C --out results/E/report/report.md \\
        [--evaluations results/E/evaluate/*/metrics.json ...] \\
        [--metrics-jsonl results/E/<run>/metrics.jsonl ...] [--grids results/E/evaluate/*/samples.png ...]

Writes report.md, report.html (same content, self-contained apart from the PNGs beside it),
results.json (the table as data) and PNG plots (FD/FID and losses vs kimg) into the --out folder.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Sequence

from sida.io.atomic import atomic_write, atomic_write_json, atomic_write_text
from sida.run.cli import run_stage, stage_parser
from sida.run.config import load_config
from sida.errors import DataError

EVAL_KEYS = ("fd", "fid", "eval/fd", "eval/fid")   # what a training run may log for its quick metric
LOSS_KEYS = ("loss_g_sid", "loss_g_dm", "loss_g_distill", "loss_g_adv", "loss_fake", "loss_d")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"evaluation {path} does not exist: run the evaluate stage for it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"evaluation {path} is not valid JSON: delete it and rerun the evaluate stage") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"training metrics {path} do not exist: run the distill stage for that run first")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line of a killed run
    return out


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def results_table(evaluations: list[dict]) -> list[dict]:
    """One row per evaluation: teacher first, then students; values as mean/std dicts."""
    rows = []
    for m in sorted(evaluations, key=lambda m: (m.get("kind") != "teacher", m.get("name", ""))):
        s = m.get("summary", {})
        # label: the method's name in the report (a run's `label`, with the step count for ADD's
        # few-step entries), older metrics.json files without one show their name
        rows.append({"name": m["name"], "label": m.get("label") or m["name"], "kind": m["kind"], "nfe": m["nfe"],
                     "steps": m.get("steps"), "metric": m["metric"],
                     "metric_label": m["metric_label"], "value": s.get(m["metric"]), "is": s.get("is"),
                     "precision": s.get("precision"), "recall": s.get("recall"), "num_runs": m["num_runs"],
                     "num_samples": m["num_samples"], "extractor": m["extractor"]["name"],
                     "extractor_sha256": m["extractor"]["sha256"], "mode": m["mode"],
                     "reference_sha256": m["reference"]["sha256"]})
    return rows


def _plot(curves: dict[str, list[dict]], keys: Sequence[str], path: Path, title: str,
          hlines: dict[str, float] | None = None) -> bool:
    """One subplot per key that any run logged; a line per run. False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in r and isinstance(r[k], (int, float)) for rs in curves.values() for r in rs)]
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.6), squeeze=False)
    for ax, k in zip(axes[0], present):
        for run, recs in curves.items():
            pts = [(r["kimg"], r[k]) for r in recs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), label=run, marker="." if len(pts) < 30 else None)
        for name, y in (hlines or {}).items():
            ax.axhline(y, ls="--", c="gray", lw=1, label=name)
        ax.set_xlabel("kimg")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def build_report(cfg: dict, out: Path, evaluations: Sequence[str], jsonls: Sequence[str],
                 grids: Sequence[str]) -> dict:
    """Write report.md, report.html, results.json and plots into out's folder; return results."""
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    evals = [_read_json(Path(p)) for p in evaluations]
    rows = results_table(evals)
    curves = {Path(p).parent.name: _read_jsonl(Path(p)) for p in jsonls}
    for g in grids:
        if not Path(g).is_file():
            raise DataError(f"sample grid {g} does not exist: run the evaluate stage that writes it first")

    label = rows[0]["metric_label"] if rows else "FD"
    teacher = [r for r in rows if r["kind"] == "teacher" and r["value"]]
    hl = {f"teacher ({teacher[0]['nfe']} NFE)": teacher[0]["value"]["mean"]} if teacher else None
    plots = []
    if _plot(curves, EVAL_KEYS, folder / "eval_vs_kimg.png", f"{label} during distillation", hl):
        plots.append(("eval_vs_kimg.png", f"{label} vs kimg (quick metric of the training monitor)"))
    if _plot(curves, LOSS_KEYS, folder / "losses_vs_kimg.png", "losses"):
        plots.append(("losses_vs_kimg.png", "losses vs kimg"))
    # Grids are copied beside the report so the page and its images move together.
    grid_files = []
    for g in grids:
        dst = folder / f"samples-{Path(g).parent.name}.png"
        with atomic_write(dst, suffix=".png") as tmp:
            shutil.copyfile(g, tmp)
        grid_files.append((dst.name, Path(g).parent.name))

    head = ["model", "kind", "NFE", label, "IS", "precision", "recall", "runs × samples"]
    body = [[r["label"], r["kind"], str(r["nfe"]), _fmt(r["value"], 3), _fmt(r["is"], 2), _fmt(r["precision"], 3),
             _fmt(r["recall"], 3), f"{r['num_runs']} × {r['num_samples']}"] for r in rows]
    extractors = sorted({(r["extractor"], r["mode"], r["extractor_sha256"][:12]) for r in rows})
    md = [f"# {cfg['experiment']}: results", "", cfg.get("description", ""), ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body]
    md += ["", "Mean ± std (ddof 1) over independent runs with disjoint seeds. Features: "
           + "; ".join(f"{n} ({m}, sha256 {h}…)" for n, m, h in extractors) + "."]
    if any(r["extractor"] == "digits_classifier" for r in rows):
        md += ["FD is measured in a small digit classifier's features, not Inception: it is not an FID and "
               "is comparable only at equal sample counts."]
    for f, cap in plots:
        md += ["", f"## {cap}", "", f"![{cap}]({f})"]
    if grid_files:
        md += ["", "## Samples", ""] + [f"**{n}**\n\n![{n}]({f})\n" for f, n in grid_files]
    md_text = "\n".join(md) + "\n"

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg['experiment'])}</title>"
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px}img{image-rendering:pixelated;max-width:100%}</style>"
         f"</head><body><h1>{html.escape(cfg['experiment'])}: results</h1><p>{html.escape(cfg.get('description', ''))}</p>",
         "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>" for b in body]
    h += ["</table><p>Mean ± std (ddof 1) over independent runs with disjoint seeds.</p>"]
    h += [f"<p>Features: {html.escape('; '.join(f'{n} ({m}, sha256 {x}…)' for n, m, x in extractors))}.</p>"]
    h += [f"<h2>{html.escape(c)}</h2><img src='{f}'>" for f, c in plots]
    if grid_files:
        h += ["<h2>Samples</h2>"] + [f"<h3>{html.escape(n)}</h3><img src='{f}' width='256'>" for f, n in grid_files]
    h += ["</body></html>"]

    results = {"experiment": cfg["experiment"], "rows": rows, "plots": [p for p, _ in plots],
               "grids": [f for f, _ in grid_files], "evaluations": [str(p) for p in evaluations],
               "metrics_jsonl": [str(p) for p in jsonls]}
    atomic_write_json(folder / "results.json", results)
    atomic_write_text(out.with_suffix(".html"), "\n".join(h) + "\n")
    atomic_write_text(out, md_text)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and write the report."""
    parser = stage_parser("python -m stages.report", "Results table, training curves and sample grids of an experiment.")
    parser.add_argument("--out", required=True, help="report.md path (report.html and results.json go beside it)")
    parser.add_argument("--evaluations", nargs="*", default=[], help="metrics.json files of the evaluate stage")
    parser.add_argument("--metrics-jsonl", nargs="*", default=[], help="metrics.jsonl of distillation runs")
    parser.add_argument("--grids", nargs="*", default=[], help="sample grid PNGs")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not args.evaluations and not args.metrics_jsonl:
        raise DataError("nothing to report: pass --evaluations results/E/evaluate/*/metrics.json and/or "
                        "--metrics-jsonl results/E/<run>/metrics.jsonl")
    res = build_report(cfg, Path(args.out), args.evaluations, args.metrics_jsonl, args.grids)
    print(f"report: {len(res['rows'])} evaluations, {len(res['plots'])} plots -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
