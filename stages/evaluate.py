"""Stage `evaluate`: sample quality of a distilled generator (one step, or --steps at the
generation sigmas its network file records) or of the multi-step teacher.

    python -m stages.evaluate --config C --network PATH --kind {generator,teacher} --name NAME \\
        [--steps K] [--label LABEL] [--train-seed K] --out results/E/evaluate/NAME/metrics.json \\
        [--set key=value ...]
    torchrun --standalone --nproc-per-node N -m stages.evaluate ...   (features gathered across ranks)

Writes `metrics.json` (per-run values, mean, std and standard error, seeds, class counts,
extractor + hash, reference + hash) and `samples.png` beside it (grid_size columns, one row per
class for a class-conditional network, enlarged with gaps between cells). All the work is in
`sida.eval.evaluation`; this module parses, runs and writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from sida.run import dist, signals
from sida.io.atomic import atomic_write_json
from sida.run.cli import run_stage, stage_parser
from sida.run.config import load_config, with_data_of


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, evaluate, write metrics.json and samples.png (main process)."""
    parser = stage_parser("python -m stages.evaluate",
                          "Evaluate a generator (1 NFE, or --steps) or the teacher (Heun) with FD/FID, IS and precision/recall.")
    parser.add_argument("--network", required=True, help="network file (results/E/<run>/network.pt or teacher)")
    parser.add_argument("--kind", required=True, choices=["generator", "teacher"],
                        help="generator: --steps steps at its generation sigmas; teacher: Heun with evaluate.teacher_steps")
    parser.add_argument("--name", required=True, help="name recorded in metrics.json (run name or 'teacher')")
    parser.add_argument("--steps", type=int, default=1,
                        help="generator: sampling steps at the generation sigmas its file records (default 1; ADD: up "
                             "to its number of student levels)")
    parser.add_argument("--label", help="the model's name in the report (default: --name)")
    parser.add_argument("--out", required=True, help="metrics.json path; samples.png is written beside it")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="the training seed of the network (recorded in metrics.json; the workflow sets it "
                             "when the config lists `seeds`)")
    args = parser.parse_args(argv)
    cfg = with_data_of(load_config(args.config, args.overrides), "evaluate")
    signals.install(raise_now=True)  # a signal stops at once: finished runs are kept, exit 75
    info = dist.init(cfg["device"], cfg["threads"])
    try:
        from sida.eval.evaluation import evaluate_network
        from sida.eval.runstore import RunStore
        from sida.io.images import save_grid

        out = Path(args.out)
        keep = (out.parent / "work", out.stem)  # finished runs, taken by a rerun
        metrics, grid = evaluate_network(cfg, args.network, args.kind, args.name, info, args.steps, args.label,
                                         args.train_seed, keep=keep)
        signals.ignore_from_now()  # all computed: a late signal must not lose metrics.json and the kept runs
        if info.is_main:
            save_grid(grid, out.with_name("samples.png"), cfg["evaluate"]["grid_size"])
            atomic_write_json(out, metrics)
            RunStore.clear_kept(*keep)
            s = metrics["summary"][metrics["metric"]]
            se = "n/a (one run)" if s["se"] is None else f"{s['se']:.4f}"
            print(f"[evaluate] {args.name}: {metrics['metric_label']} {s['mean']:.4f}, std {s['std']:.4f}, se {se} "
                  f"({metrics['num_runs']} runs x {metrics['num_samples']} samples, {metrics['labels']} labels, "
                  f"{metrics['nfe']} NFE) -> {out}", file=sys.stderr, flush=True)
        dist.barrier()
    finally:
        dist.shutdown()


if __name__ == "__main__":
    run_stage(main)
