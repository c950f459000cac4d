"""Stage `teacher`: train an EDM teacher on the config's dataset.

    python -m stages.teacher --config config/config.yaml [--out results/<experiment>/teacher]
    torchrun --standalone --nproc-per-node N -m stages.teacher --config ...

Outputs (in --out): network.pt (the EMA network, our format), samples.png (Heun, 18 steps),
metrics.jsonl. A killed run resumes from --out/work/state.pt when rerun with the same command.
"""

from __future__ import annotations

from typing import Sequence

from sida.io import checkpoints
from sida.run.cli import run_stage, stage_parser
from sida.run.config import load_config
from sida.io.data import open_dataset
from sida.io.factory import network_from_config
from sida.io.images import save_grid
from sida.train.loop import Checkpointer, run
from sida.run.runtime import start_stage
from sida.eval.sampling import grid_samples
from sida.train.teacher import TeacherLoop

GRID = 8


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m stages.teacher", "Train an EDM teacher on the config's dataset.")
    parser.add_argument("--out", help="output directory (default: <results_dir>/<experiment>/teacher)")
    args = parser.parse_args(argv)
    cfg0 = load_config(args.config, args.overrides)
    out = args.out or f"{cfg0['results_dir']}/{cfg0['experiment']}/teacher"
    ctx = start_stage(cfg0, out, salt="teacher")
    cfg, info = ctx.cfg, ctx.info
    dataset = open_dataset(cfg["data"])
    net = network_from_config(cfg).to(info.device)
    if info.is_main:
        n = sum(p.numel() for p in net.parameters())
        ctx.log(f"teacher: {cfg['network']['model_type']} with {n / 1e6:.2f}M parameters on {dataset!r}, "
                f"{info.world_size} process(es) on {info.device}")
    loop = TeacherLoop(cfg, net, dataset, info, seed=ctx.seed)
    ckpt = Checkpointer(ctx.work, info, ctx.cfg_hash, "teacher")
    if ckpt.load_if_any(loop):
        ctx.log(f"teacher: resuming from {ckpt.path} at {loop.nimg / 1000:.2f} kimg")
    tracker = ctx.tracker("teacher", resume_kimg=loop.nimg / 1000 if loop.nimg else None)
    t = cfg["teacher"]

    def snapshot() -> None:
        if info.is_main:
            save_grid(grid_samples(loop.ema, GRID, cfg["seed"], steps=18), ctx.work / "samples.png", GRID)

    run(loop, int(t["kimg"] * 1000), t["tick_kimg"], t["snapshot_kimg"], ckpt, info,
        on_tick=lambda row: tracker.log(row, loop.nimg / 1000), on_snapshot=snapshot, label="teacher: ",
        watch={"net": loop.net, "ema": loop.ema}, nonfinite_budget=t["nonfinite_budget"])
    if info.is_main:
        save_grid(grid_samples(loop.ema, GRID, cfg["seed"], steps=18), ctx.out / "samples.png", GRID)
        checkpoints.save_network(ctx.out / "network.pt", loop.ema,
                                 meta={"stage": "teacher", "kimg": loop.nimg / 1000, "config_hash": ctx.cfg_hash,
                                       "experiment": cfg["experiment"]})
    ctx.finish(tracker, ckpt, ctx.out / "network.pt")


if __name__ == "__main__":
    run_stage(main)
