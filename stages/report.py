"""Stage `report`: one page per experiment: results with their uncertainty, paired differences,
quality vs training images, sample grids and training curves.

    python -m stages.report --config C --out results/E/report/report.md \\
        [--evaluations results/E/evaluate/*/metrics.json ...] \\
        [--metrics-jsonl results/E/<run>/metrics.jsonl ...] [--grids results/E/evaluate/*/samples.png ...]

Writes report.md, report.html (same content, self-contained apart from the PNGs beside it),
results.json (the table, the comparisons and the evaluation spread as data) and PNG plots into
the --out folder. The numbers come from `sida.eval.summary`, the figures from `sida.eval.plots`;
this module reads the inputs and lays the page out (one list of blocks, rendered twice).
"""

from __future__ import annotations

import html
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from sida.errors import DataError
from sida.io.atomic import atomic_write, atomic_write_json, atomic_write_text
from sida.run.cli import run_stage, stage_parser
from sida.run.config import load_config

EVAL_KEYS = ("fd", "fid", "eval/fd", "eval/fid")   # what a training run may log for its quick metric
LOSS_KEYS = ("loss_g_sid", "loss_g_dm", "loss_g_distill", "loss_g_adv", "loss_fake", "loss_d")
DISC_KEYS = ("d_acc_real", "d_acc_fake", "d_acc")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"evaluation {path} does not exist: run the evaluate stage for it first")
    try:
        m = json.loads(path.read_text())
    except ValueError:  # not JSON, or not even text
        raise DataError(f"evaluation {path} is not valid JSON: delete it and rerun the evaluate stage") from None
    from sida.eval.summary import group_models, results_rows
    try:
        results_rows(group_models([m]))
    except (KeyError, TypeError, AttributeError) as exc:
        what = f"no key {exc}" if isinstance(exc, KeyError) else "another layout"
        raise DataError(f"evaluation {path} is not a metrics.json of the evaluate stage ({what}): delete it and "
                        f"rerun the evaluate stage") from None
    return m


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"training metrics {path} do not exist: run the distill stage for that run first")
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line of a killed run
        if isinstance(rec, dict):
            out.append(rec)
    return out


# ---- number formatting ---------------------------------------------------------------------

def _num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _with_se(stat: dict | None, digits: int) -> str:
    """'mean ± se' (se over evaluation runs, or over training seeds when there are several)."""
    if not stat:
        return "–"
    return _num(stat["mean"], digits) if stat["se"] is None else f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


# ---- page content as blocks ----------------------------------------------------------------

def _results_table(rows: list[dict], label: str) -> tuple[list[str], list[list[str]]]:
    """Every value as mean ± its standard error; with training seeds also the std over seeds and
    the evaluation's own standard error of one network, side by side."""
    seeded = any(r["train_seeds"] for r in rows)
    head = ["model", "NFE", f"{label} ± SE"]
    if seeded:
        head += ["std over training seeds", "evaluation SE of one network"]
    extra = list(dict.fromkeys((x["metric"], x["metric_label"]) for r in rows for x in r.get("extra") or []))
    head += [f"{lab} ± SE" for _, lab in extra]  # extra feature networks, of the same samples
    aligned = any(r.get("alignment") for r in rows)  # text-to-image networks on class-labelled data
    clip = any(r.get("clip_score") for r in rows)  # text-to-image networks on COCO captions
    head += ["IS ± SE", "precision ± SE", "recall ± SE"] + (["prompt alignment ± SE"] if aligned else [])
    head += ["CLIP score ± SE"] if clip else []
    head += (["training seeds"] if seeded else []) + ["runs × samples"]
    body = []
    for r in rows:
        v = r["value"] or {}
        cells = [r["label"], str(r["nfe"]), _with_se(r["value"], 3)]
        if seeded:
            cells += [_num(v.get("seed_std"), 3), _num(v.get("eval_se"), 3)]
        xs = {x["metric"]: x["value"] for x in r.get("extra") or []}
        cells += [_with_se(xs.get(key), 3) for key, _ in extra]
        cells += [_with_se(r["is"], 2), _with_se(r["precision"], 3), _with_se(r["recall"], 3)]
        if aligned:
            cells.append(_with_se(r.get("alignment"), 3))
        if clip:
            cells.append(_with_se(r.get("clip_score"), 4))
        if seeded:
            cells.append("–" if not r["train_seeds"] else ", ".join(map(str, r["train_seeds"])))
        body.append(cells + [f"{r['num_runs']} × {r['num_samples']:,}"])
    return head, body


def _comparison_table(comps: list[dict], label: str, digits: int = 3) -> tuple[list[str], list[list[str]]]:
    head = ["difference", f"Δ {label}", "95 % interval", "paired over", "verdict"]
    body = []
    for c in comps:
        if c.get("unit") is None:
            body.append([f"{c['a_label']} − {c['b_label']}", "–", "–", "–", c["verdict"]])
            continue
        ci = "–" if c["ci"] is None else f"[{_signed(c['ci'][0], digits)}, {_signed(c['ci'][1], digits)}]"
        body.append([f"{c['a_label']} − {c['b_label']}", _signed(c["mean"], digits), ci, f"{c['n']} {c['unit']}",
                     c["verdict"]])
    return head, body


def _per_seed_table(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    seeds = sorted({s for r in rows if r["value"] and r["value"]["per_seed"] for s in r["value"]["per_seed"]}, key=int)
    if not seeds:
        return None
    head = ["model"] + [f"seed {s}" for s in seeds]
    body = [[r["label"]] + [_num((r["value"]["per_seed"] or {}).get(s), 3) for s in seeds]
            for r in rows if r["value"] and r["value"]["per_seed"]]
    return head, body


def _reach_blocks(reach: dict | None, label: str, labels: dict[str, str]) -> list[tuple]:
    """The 'training images to reach' table and its paired differences (see `sida.eval.reach`)."""
    if not reach or not reach["runs"]:
        return []
    name = lambda run: labels.get(run, run)  # noqa: E731
    seeds = list(reach["runs"][0]["per_seed"])
    head = ["model", "reached (seeds)", "kimg: mean", "std"] + ([f"seed {s}" for s in seeds] if seeds != ["-"] else [])
    body = []
    for r in reach["runs"]:
        cells = [name(r["run"]), f"{r['reached']} of {r['seeds']}", _num(r["mean"], 1), _num(r["std"], 1)]
        if seeds != ["-"]:
            cells += ["not reached" if r["per_seed"].get(s) is None else f"{r['per_seed'][s]:.1f}" for s in seeds]
        body.append(cells)
    out = [("h2", f"Training images to reach {label} ≤ {reach['threshold']:.3f}"),
           ("p", f"kimg until the training monitor's {label} first falls to {reach['threshold']:.3f} or below "
                 f"({reach['source']}), counting every image a method trained on, the runs it started from "
                 "included; a run that never gets there within its schedule is 'not reached'."),
           ("table", head, body)]
    comps = [c for c in reach["comparisons"] if c["mean"] is not None]
    if comps:
        chead = ["difference", "Δ kimg", "95 % interval", "paired over", "note"]
        cbody = [[f"{name(c['a'])} − {name(c['b'])}", _signed(c["mean"], 1),
                  "–" if c["ci"] is None else f"[{_signed(c['ci'][0], 1)}, {_signed(c['ci'][1], 1)}]",
                  f"{c['n']} training seeds", c["note"] or "–"] for c in comps]
        out.append(("table", chead, cbody))
    return out


def _spread_sentence(spread: dict | None, label: str) -> str:
    if not spread:
        return "The evaluation's own spread is not measured (fewer than 2 evaluation runs of the teacher)."
    rel = spread["relative_std"]
    text = (f"The evaluation's own spread, measured on the teacher (one network, {spread['n_runs']} runs): std "
            f"{spread['std']:.3f} over runs = {100 * rel:.1f} % of its {label} {spread['mean']:.3f}; the standard error "
            f"of the mean {spread['se']:.3f} ({100 * spread['relative_se']:.1f} %).")
    students = [m for m in spread.get("models", []) if m["model"] != spread["model"] and m["relative_teacher"] is not None]
    if students:
        text += (" Every other model's std over its runs (one network), as % of the teacher's and of its own "
                 f"{label}: " + "; ".join(f"{m['label']} {m['std']:.3f} ({100 * m['relative_teacher']:.1f} %, "
                                          f"{100 * m['relative_own']:.1f} %)" for m in students) + ".")
    return text


def _protocol_sentence(rows: list[dict]) -> str:
    r = rows[0]
    labels = {"balanced": "balanced class labels (class = seed mod classes; real images class-balanced too)",
              "random": "one random class label per seed (the papers' protocol)"}.get(r["labels"], r["labels"])
    if r.get("latents") == "sobol":
        labels += ("; noise by randomized quasi-Monte Carlo (a scrambled Sobol sequence per run and class "
                   "through the normal quantile: each z is N(0, I), each run an independent scrambling)")
    seeded = any(x["train_seeds"] for x in rows)
    unc = ("± is the standard error of the mean over evaluation runs with disjoint seeds" if not seeded else
           "± is the standard error of the mean: over training seeds for a model trained from several seeds "
           "(their std and the evaluation's own standard error of one network are the next columns), over "
           "evaluation runs for a single network")
    return (f"Each evaluation: {r['num_runs']} runs × {r['num_samples']:,} samples, {labels}; {unc}. "
            "Differences are paired (the same evaluation seeds, or the same training seed) with a 95 % t "
            "interval; a difference is called one only when its interval excludes 0.")


def _blocks(cfg: dict, rows: list[dict], comps: list[dict], spread: dict | None, plots: list[tuple[str, str]],
            grids: list[tuple[str, str]], reach: dict | None = None) -> list[tuple]:
    label = rows[0]["metric_label"] if rows else "FD"
    b: list[tuple] = [("h1", f"{cfg['experiment']}: results")]
    if cfg.get("description"):
        b.append(("p", cfg["description"]))
    if rows:
        b += [("table", *_results_table(rows, label)), ("p", _protocol_sentence(rows)),
              ("p", _spread_sentence(spread, label))]
        from sida.eval.summary import PAIRED_KEYS

        main = [c for c in comps if c["metric"] not in PAIRED_KEYS]
        if main:
            b += [("h2", "Differences between models"), ("table", *_comparison_table(main, label))]
        clip = [c for c in comps if c["metric"] == "clip_score"]
        if clip:
            b += [("h2", "Differences in CLIP score (higher is better)"),
                  ("table", *_comparison_table(clip, "CLIP score", 4))]
        b += _reach_blocks(reach, label, {run: spec.get("label") or run for run, spec in cfg["distill"]["runs"].items()})
        extractors = sorted({(r["extractor"], r["mode"], r["extractor_sha256"][:12]) for r in rows})
        b.append(("p", "Features: " + "; ".join(f"{n} ({m}, sha256 {h}…)" for n, m, h in extractors) + "."))
        if any(r["extractor"] == "digits_classifier" for r in rows):
            b.append(("p", "FD is measured in a small digit classifier's features, not Inception: it is not an FID "
                           "and is comparable only at equal sample counts."))
    for f, cap in plots[:1]:
        b += [("h2", cap), ("img", f, cap)]
    if grids:
        b += [("h2", "Samples"), ("p", "Enlarged (nearest neighbour); one row per class for class-conditional "
                                       "models; the same latents for every model."), ("grids", grids)]
    for f, cap in plots[1:]:
        b += [("h2", cap), ("img", f, cap)]
    per_seed = _per_seed_table(rows)
    if per_seed:
        b += [("h2", f"{label} per training seed (mean over evaluation runs)"), ("table", *per_seed)]
    return b


def _markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            out += ["#" * int(kind[1]) + " " + blk[1], ""]
        elif kind == "p":
            out += [blk[1], ""]
        elif kind == "table":
            head, body = blk[1], blk[2]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(r) + " |" for r in body] + [""]
        elif kind == "img":
            out += [f"![{blk[2]}]({blk[1]})", ""]
        elif kind == "grids":
            out += [f"**{name}**\n\n![{name}]({f})\n" for f, name in blk[1]]
    return "\n".join(out).rstrip() + "\n"


def _html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
           "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
           ".grids{display:flex;flex-wrap:wrap;gap:24px}.grids figure{margin:0}"
           ".grids img{image-rendering:pixelated}figcaption{text-align:center;font-weight:bold}"
           "</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(blk[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in blk[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in blk[2]]
            out.append("</table>")
        elif kind == "img":
            out.append(f"<img src='{e(blk[1])}' alt='{e(blk[2])}'>")
        elif kind == "grids":
            out.append("<div class='grids'>" + "".join(
                f"<figure><figcaption>{e(name)}</figcaption><img src='{e(f)}' alt='{e(name)}'></figure>"
                for f, name in blk[1]) + "</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- the stage --------------------------------------------------------------------------------

def _copy_grids(grids: Sequence[str], folder: Path, labels: dict[str, str]) -> list[tuple[str, str]]:
    """Copy one grid per model (the first training seed's) beside the report; (file, caption),
    the caption the model's label (`labels`: name -> label; the name when missing)."""
    from sida.eval.plots import run_and_seed

    chosen: dict[str, tuple[int | None, Path]] = {}
    for g in map(Path, grids):
        if not g.is_file():
            raise DataError(f"sample grid {g} does not exist: run the evaluate stage that writes it first")
        name, seed = run_and_seed(g)
        if name not in chosen or (seed is not None and (chosen[name][0] is None or seed < chosen[name][0])):
            chosen[name] = (seed, g)
    out = []
    for name, (seed, g) in sorted(chosen.items(), key=lambda kv: (kv[0] != "teacher", kv[0])):
        dst = folder / f"samples-{name}.png"
        with atomic_write(dst, suffix=".png") as tmp:
            shutil.copyfile(g, tmp)
        caption = labels.get(name, name)
        out.append((dst.name, caption if seed is None else f"{caption} (training seed {seed})"))
    return out


def _reach(curves: dict, offsets: dict[str, float], monitor: dict, teacher: dict | None) -> dict | None:
    """`sida.eval.reach.reach_summary` at the configured threshold, else the teacher's FD under the
    monitor's protocol; None when there is neither or no run logged a monitor value."""
    from sida.eval.reach import reach_summary

    key = next((k for k in EVAL_KEYS if any(k in r for recs in curves.values() for rs in recs.values() for r in rs)),
               None)
    threshold, source = monitor.get("reach_threshold"), "evaluate.during_training.reach_threshold"
    if threshold is None and teacher is not None:
        threshold = teacher["monitor"]
        source = f"the teacher's {teacher['nfe']}-NFE value on the monitor's {monitor['num_samples']:,} samples"
    if key is None or threshold is None:
        return None
    return {**reach_summary(curves, key, float(threshold), offsets), "source": source}


def build_report(cfg: dict, out: Path, evaluations: Sequence[str], jsonls: Sequence[str],
                 grids: Sequence[str]) -> dict:
    """Write report.md, report.html, results.json and plots into out's folder; return results."""
    from sida.eval.plots import (plot_quality_vs_images, plot_quality_vs_text_score, plot_scalars, run_and_seed,
                                 upstream_kimg)
    from sida.eval.summary import comparisons, evaluation_spread, group_models, results_rows

    folder = out.parent
    try:
        models = group_models([_read_json(Path(p)) for p in evaluations])
    except ValueError as exc:
        raise DataError(f"evaluations: {exc}") from None
    rows, comps, spread = results_rows(models), comparisons(models), evaluation_spread(models)
    curves: dict = {}
    for p in jsonls:
        run, seed = run_and_seed(p)
        curves.setdefault(run, {})[seed] = _read_jsonl(Path(p))
    for g in grids:  # every input checked before anything is written
        if not Path(g).is_file():
            raise DataError(f"sample grid {g} does not exist: run the evaluate stage that writes it first")
    folder.mkdir(parents=True, exist_ok=True)
    grid_files = _copy_grids(grids, folder, {r["name"]: r["label"] for r in rows})

    label = rows[0]["metric_label"] if rows else "FD"
    offsets = upstream_kimg(cfg["distill"]["runs"])
    teacher = next((r for r in rows if r["kind"] == "teacher" and r["monitor"] is not None), None)
    level = None if teacher is None else (f"teacher ({teacher['nfe']} NFE), same sample count", teacher["monitor"])
    monitor = cfg["evaluate"]["during_training"]
    plots = []
    if plot_quality_vs_images(curves, EVAL_KEYS, offsets, folder / "quality_vs_images.png",
                              f"{label}, {monitor['num_samples']:,} samples", level,
                              names={run: spec.get("label") or run for run, spec in cfg["distill"]["runs"].items()}):
        plots.append(("quality_vs_images.png", f"{label} vs training images (the training monitor's "
                                               f"{monitor['num_samples']:,} samples; log scales)"))
    if plot_quality_vs_text_score(rows, folder / "quality_vs_alignment.png", label):
        plots.append(("quality_vs_alignment.png", f"{label} against prompt alignment or CLIP score (± SE)"))
    if plot_scalars(curves, LOSS_KEYS, offsets, folder / "losses_vs_kimg.png", "losses"):
        plots.append(("losses_vs_kimg.png", "Losses vs training images"))
    if plot_scalars(curves, DISC_KEYS, offsets, folder / "discriminator_vs_kimg.png",
                    "discriminator accuracy (real and fake separately)"):
        plots.append(("discriminator_vs_kimg.png", "Discriminator accuracy vs training images"))

    reach = _reach(curves, offsets, monitor, teacher)
    blocks = _blocks(cfg, rows, comps, spread, plots, grid_files, reach)
    results = {"experiment": cfg["experiment"], "rows": rows, "comparisons": comps, "evaluation_spread": spread,
               "reach": reach,
               "plots": [p for p, _ in plots], "grids": [f for f, _ in grid_files],
               "evaluations": [str(p) for p in evaluations], "metrics_jsonl": [str(p) for p in jsonls]}
    atomic_write_json(folder / "results.json", results)
    atomic_write_text(out.with_suffix(".html"), _html(blocks, cfg["experiment"]))
    atomic_write_text(out, _markdown(blocks))
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
    print(f"report: {len(res['rows'])} models, {len(res['comparisons'])} comparisons, {len(res['plots'])} plots "
          f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
