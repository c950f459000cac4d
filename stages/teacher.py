"""Stage `teacher`: train a teacher on the config's dataset.

    python -m stages.teacher --config config/config.yaml [--out results/<experiment>/teacher]
    torchrun --standalone --nproc-per-node N -m stages.teacher --config ...

teacher.source train: an EDM teacher; outputs (in --out) network.pt (the EMA network, our
format), samples.png (Heun, 18 steps), metrics.jsonl.
teacher.source train_text: the text-to-image testbed's teacher (sida.train.text_teacher);
outputs pipeline/ (a VAE-less StableDiffusionPipeline folder, the EMA UNet), prompts.txt (every
caption template for every digit, one a line), samples.png (DDIM with classifier-free
guidance, row d prompted with digit d), metrics.jsonl.
A killed run resumes from --out/work/state.pt when rerun with the same command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from sida.io import checkpoints
from sida.run.cli import run_stage, stage_parser
from sida.run.config import load_config, with_data_of
from sida.io.data import open_dataset
from sida.nets.build import network_from_config
from sida.io.images import save_grid
from sida.train.driver import Checkpointer, run
from sida.run.runtime import StageContext, start_stage
from sida.eval.sampling import grid_samples
from sida.train.teacher import TeacherLoop

GRID = 8


def _edm_teacher(ctx: StageContext, cfg: dict, dataset) -> tuple[TeacherLoop, Callable[[], torch.Tensor],
                                                                  Callable[[], Path]]:
    """The EDM teacher's loop, its sample grid and its output writer."""
    info = ctx.info
    net = network_from_config(cfg).to(info.device)
    if info.is_main:
        n = sum(p.numel() for p in net.parameters())
        ctx.log(f"teacher: {cfg['network']['model_type']} with {n / 1e6:.2f}M parameters on {dataset!r}, "
                f"{info.world_size} process(es) on {info.device}")
    loop = TeacherLoop(cfg, net, dataset, info, seed=ctx.seed)

    def write() -> Path:
        checkpoints.save_network(ctx.out / "network.pt", loop.ema,
                                 meta={"stage": "teacher", "kimg": loop.nimg / 1000, "config_hash": ctx.cfg_hash,
                                       "experiment": cfg["experiment"]})
        return ctx.out / "network.pt"

    return loop, lambda: grid_samples(loop.ema, GRID, cfg["seed"], steps=18), write


def _text_teacher(ctx: StageContext, cfg: dict, dataset) -> tuple[TeacherLoop, Callable[[], torch.Tensor],
                                                                   Callable[[], Path]]:
    """The text-to-image testbed teacher's loop, its sample grid and its output writer."""
    from sida.eval.text_teacher import sample_text_grid
    from sida.io.clip_text import clip_tokenizer, make_text_encoder
    from sida.io.digits_text import prompt_set, write_prompts
    from sida.io.text_pipeline import save_text_pipeline
    from sida.train.text_teacher import TextTeacherLoop, check_text_data, text_unet

    info, t = ctx.info, cfg["teacher"]
    text = t["text"]
    check_text_data(cfg)
    tokenizer = clip_tokenizer(text["max_length"])
    encoder = make_text_encoder(text["width"], text["layers"], text["heads"], text["max_length"],
                                text["seed"]).to(info.device)
    unet = text_unet(cfg).to(info.device)
    if info.is_main:
        n = sum(p.numel() for p in unet.parameters())
        ctx.log(f"teacher: UNet2DConditionModel with {n / 1e6:.2f}M parameters, text encoder width {text['width']}, "
                f"{len(text['templates'])} caption templates on {dataset!r}, {info.world_size} process(es) on "
                f"{info.device}")
    loop = TextTeacherLoop(cfg, unet, dataset, info, tokenizer, encoder, seed=ctx.seed)

    def grid() -> torch.Tensor:
        return sample_text_grid(loop.ema, loop.scheduler, tokenizer, encoder, text["templates"], GRID,
                                t["guidance_scale"], t["sample_steps"], cfg["seed"])

    def write() -> Path:
        # The distillation reads the teacher as every diffusers pipeline is read: a network file
        # of the folder (its pipeline_dir) made by the same loader as the fetch stage's.
        from sida.io.diffusers_teacher import load_teacher

        write_prompts(ctx.out / "prompts.txt", prompt_set(10 * len(text["templates"]), text["templates"])[0])
        folder = save_text_pipeline(ctx.out / "pipeline", loop.ema, encoder, loop.scheduler, text["max_length"])
        checkpoints.save_network(ctx.out / "network.pt", load_teacher(folder),
                                 meta={"stage": "teacher", "kimg": loop.nimg / 1000, "config_hash": ctx.cfg_hash})
        return ctx.out / "network.pt"

    return loop, grid, write


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m stages.teacher", "Train a teacher on the config's dataset.")
    parser.add_argument("--out", help="output directory (default: <results_dir>/<experiment>/teacher)")
    args = parser.parse_args(argv)
    cfg0 = load_config(args.config, args.overrides)
    out = args.out or f"{cfg0['results_dir']}/{cfg0['experiment']}/teacher"
    ctx = start_stage(cfg0, out, salt="teacher")
    cfg, info = with_data_of(ctx.cfg, "teacher"), ctx.info  # the testbed's teacher trains on teacher.data
    dataset = open_dataset(cfg["data"])
    build = _text_teacher if cfg["teacher"]["source"] == "train_text" else _edm_teacher
    loop, grid, write = build(ctx, cfg, dataset)
    ckpt = Checkpointer(ctx.work, info, ctx.cfg_hash, "teacher")
    if ckpt.load_if_any(loop):
        ctx.log(f"teacher: resuming from {ckpt.path} at {loop.nimg / 1000:.2f} kimg")
    tracker = ctx.tracker("teacher", resume_kimg=loop.nimg / 1000 if loop.nimg else None)
    t = cfg["teacher"]

    def snapshot() -> None:
        if info.is_main:
            save_grid(grid(), ctx.work / "samples.png", GRID)

    timings = run(loop, int(t["kimg"] * 1000), t["tick_kimg"], t["snapshot_kimg"], ckpt, info,
                  on_tick=lambda row: tracker.log(row, loop.nimg / 1000), on_snapshot=snapshot, label="teacher: ",
                  watch={"net": loop.net, "ema": loop.ema}, nonfinite_budget=t["nonfinite_budget"])
    ctx.log(f"teacher: {timings.line()}")
    written = ctx.out / "network.pt"
    if info.is_main:
        save_grid(grid(), ctx.out / "samples.png", GRID)
        written = write()
    ctx.finish(tracker, ckpt, written)


if __name__ == "__main__":
    run_stage(main)
