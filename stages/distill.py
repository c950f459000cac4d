"""Stage `distill`: one distillation run (warmup / SiD / SiDA / SiD2A / DMD / DMD2 / ADD) as
configured in `distill.runs.<name>`.

    python -m stages.distill --config C --run sid --teacher results/E/teacher/network.pt \
        [--init results/E/warmup/state.pt] [--init-generator results/E/sid/network.pt] [--out DIR]
    torchrun --standalone --nproc-per-node N -m -- stages.distill --config C --run sid ...
    (the `--` ends torchrun's options: it matches them by prefix, so a bare `--run` would be
    rejected as "ambiguous: --run-path, --run_path")

Outputs (in --out, default <results_dir>/<experiment>/<run>): network.pt (the EMA one-step
generator, or the raw one with `ema: false`; its metadata holds the generation sigmas that
generate / evaluate use), state.pt (G, G_ema, the fake score and a DMD2 / ADD discriminator head,
for runs that start from this one), samples.png, metrics.jsonl. A killed run resumes from
--out/work/state.pt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch

from sida.io import checkpoints
from sida.run.cli import run_stage, stage_parser
from sida.run.config import discriminator_kind, load_config, run_config, run_method, with_data_of
from sida.io.data import open_dataset
from sida.io.latents import codec_from_config, decoder_from_config
from sida.train.loop import DistillLoop
from sida.train.nets import init_nets
from sida.train.run_checks import precision_warning
from sida.train.sharding import consolidated_network, is_sharded, plain_module
from sida.io.text_run import is_text_network, open_run_text_dataset, vae_of
from sida.eval.prompting import grid_prompts
from sida.nets.heads import head_record
from sida.errors import CheckpointError, ConfigError
from sida.io.images import save_grid
from sida.train.driver import Checkpointer, Timings, run
from sida.eval.monitor import TrainingMonitor
from sida.run.runtime import start_stage
from sida.nets.sampler import one_step_generate
from sida.io.killpoint import kill_point
from sida.eval.sampling import grid_samples


def check_teacher(teacher, cfg: dict, path: str) -> None:
    """The teacher must produce images of the configured dataset's shape and labels."""
    d = cfg["data"]
    got = (teacher.img_resolution, teacher.img_channels, teacher.label_dim)
    want = (d["resolution"], d["channels"], d["label_dim"])
    if got != want:
        raise CheckpointError(f"teacher {path} is {got[0]}x{got[0]}x{got[1]} with label_dim {got[2]}, but the "
                              f"config's data is {want[0]}x{want[0]}x{want[1]} with label_dim {want[2]}: "
                              f"fix data.* or pass the matching teacher")


class BestKeeper:
    """Evaluate the EMA generator every `evaluate.during_training.every_kimg` and keep the best
    one (the papers report their lowest-FID snapshot). Its record and the best weights are part
    of the resume checkpoint (`Checkpointer.track`), never files of their own: a run killed after
    an evaluation resumes from the checkpoint before it and evaluates again, exactly as the
    uninterrupted run did."""

    def __init__(self, monitor: TrainingMonitor, ctx, nets, sigma_init: float, text=None) -> None:
        self.monitor, self.ctx, self.nets, self.sigma_init = monitor, ctx, nets, sigma_init
        self.text = text  # a text run's (class prompts, decode): labels become prompts, latents images
        self.record: dict = {}
        self.best: dict[str, torch.Tensor] | None = None  # G_ema's state dict at its best (main process)

    def state_dict(self) -> dict:
        return {"record": json.dumps(self.record), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.record = json.loads(state["record"])
        self.best = state["best"] if self.ctx.info.is_main else None

    def maybe_evaluate(self, nimg: int, phase: str) -> dict[str, float]:
        """{metric: value} when an evaluation is due at `nimg` (called on every rank), else {}.
        Warm-up ticks are skipped: the generator does not change there."""
        if not self.monitor.enabled or phase == "warmup":
            return {}
        every = int(self.monitor.every_kimg * 1000)
        if nimg // every == self.record.get("last_nimg", 0) // every:
            return {}
        # The training streams must not move: the monitor's first call builds its extractor (module
        # constructors draw from torch's global RNG), and only some processes make that call
        # first (a resumed one), so a draw here would split resumed runs from uninterrupted ones.
        device = torch.device(self.ctx.info.device)
        def generate(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if self.text is None:
                return one_step_generate(G, z, labels, sigma_init=self.sigma_init)
            prompts, decode = self.text
            x = one_step_generate(G, z, prompts(labels), sigma_init=self.sigma_init)
            return x if decode is None else decode(x)

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # A sharded G_ema is gathered whole on every process: the monitor splits its seeds
            # over processes unevenly, and a sharded forward needs every process in step.
            G = self.nets.G_ema
            G = consolidated_network(G, everywhere=True) if is_sharded(G) else G
            value = self.monitor(generate)
        key, v = self.monitor.key, value[self.monitor.key]
        best = self.record.get("best")
        self.record["last_nimg"] = nimg
        if best is None or v < best:
            self.record.update(best=v, best_kimg=nimg / 1000, key=key)
            if self.ctx.info.is_main:
                self.best = {k: t.detach().cpu().clone() for k, t in G.state_dict().items()}
        self.ctx.log(f"  {key} {v:.4f} (best {self.record['best']:.4f} at {self.record['best_kimg']:.2f} kimg)")
        kill_point("evaluated")
        return {key: v, f"best_{key}": self.record["best"]}

    def best_network(self) -> torch.nn.Module | None:
        """A copy of G_ema with the best weights seen (None before any evaluation)."""
        if self.best is None:
            return None
        G = self.nets.G_ema
        net = plain_module(G) if is_sharded(G) else copy.deepcopy(G)
        net.load_state_dict(self.best)
        return net


def resolve_add_features(cfg: dict, rc: dict) -> str | None:
    """ADD runs on DINOv2: the weights file (default the fetch stage's dinov2_<arch>.pth), checked
    to exist before anything is written, and its sha256 (kept in the resume state: a resumed run
    must see the same frozen features). None for every other run."""
    spec = rc["add_features"]
    if discriminator_kind(rc["discriminator"]) != "add" or spec["kind"] != "dinov2":
        return None
    from sida.errors import AssetError
    from sida.io.assets import sha256_file

    if spec["weights"] is None:
        spec["weights"] = f"{cfg['results_dir']}/{cfg['experiment']}/fetch/dinov2_{spec['arch']}.pth"
    if not Path(spec["weights"]).is_file():
        raise AssetError(f"ADD's feature network: DINOv2 weights {spec['weights']} do not exist: add a fetch asset of "
                         f"kind dinov2 with arch {spec['arch']}, or set distill.add_features.weights")
    return sha256_file(spec["weights"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m stages.distill", "Run one distillation run of the config.")
    parser.add_argument("--run", required=True, help="name of the run in distill.runs (e.g. warmup, sid, sida, sid2a)")
    parser.add_argument("--teacher", required=True, help="teacher network file (ours: from the teacher or fetch stage)")
    parser.add_argument("--init", help="state.pt of the run this one starts from (when its init is not 'teacher')")
    parser.add_argument("--init-generator", help="network.pt whose EMA generator initialises G (SiD2A)")
    parser.add_argument("--out", help="output directory (default: <results_dir>/<experiment>/<run>)")
    args = parser.parse_args(argv)
    timings = Timings()
    cfg0 = load_config(args.config, args.overrides)
    rc = run_config(cfg0, args.run)
    if rc["init"] != "teacher" and not args.init:
        raise ConfigError(f"run '{args.run}' starts from run '{rc['init']}': pass --init "
                          f"{cfg0['results_dir']}/{cfg0['experiment']}/{rc['init']}/state.pt")
    if rc["init_generator"] and not args.init_generator:
        raise ConfigError(f"run '{args.run}' takes its generator from run '{rc['init_generator']}': pass "
                          f"--init-generator {cfg0['results_dir']}/{cfg0['experiment']}/{rc['init_generator']}/network.pt")
    out = args.out or f"{cfg0['results_dir']}/{cfg0['experiment']}/{args.run}"
    # Inputs are read and checked before anything is created under --out.
    teacher = checkpoints.load_network(args.teacher)
    check_teacher(teacher, cfg0, args.teacher)
    init_state = checkpoints.load_state(args.init) if args.init else None
    init_gen = checkpoints.load_network(args.init_generator) if args.init_generator else None
    features_sha = resolve_add_features(cfg0, rc)
    ctx = start_stage(cfg0, out, salt=f"distill/{args.run}")
    cfg, info = ctx.cfg, ctx.info
    teacher = teacher.to(info.device)
    init_gen = init_gen.to(info.device) if init_gen is not None else None
    nets = init_nets(teacher, rc["dropout"], init_state, init_gen)
    # Real images for a discriminator and for ADD's student; class labels (drawn from dataset
    # samples, as the official loop does) for every class-conditional run; data-free latent runs
    # read only the labels.
    # Text teachers: prompt embeddings from a prompt set, or captioned images in the teacher's space.
    if is_text_network(teacher):
        dataset = open_run_text_dataset(cfg["data"], teacher, info.device,
                                        Path(cfg["results_dir"]) / cfg["experiment"] / "data_cache")
    else:
        needs_data = (discriminator_kind(rc["discriminator"]) != "none" or run_method(rc["phases"]) == "add"
                      or cfg["data"]["label_dim"] > 0)
        dataset = open_dataset(cfg["data"], codec_from_config(cfg)) if needs_data else None
    # Latent-space runs: samples.png shows decoded images; text runs: one prompt per grid row.
    if is_text_network(teacher):
        vae = vae_of(teacher, info.device)
        decode = None if vae is None else vae.decode
        text = (grid_prompts(cfg, teacher, dataset, info.device), decode)
    else:
        decoder = decoder_from_config(cfg, info.device)
        decode, text = decoder and decoder.unit, None
    loop = DistillLoop(rc, nets, dataset, info, sigma_data=getattr(teacher, "sigma_data", 0.5), seed=ctx.seed)
    rc = loop.rc  # with what the loop resolves from the teacher (sigma_init of an init_timestep)
    loop.features_sha256 = features_sha
    sharded = loop.mesh is not None
    ckpt = Checkpointer(ctx.work, info, ctx.cfg_hash, f"distill/{args.run}", sharded=sharded)
    noise = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    monitor = TrainingMonitor(with_data_of(cfg, "evaluate"), info.device, info, noise)
    keeper = BestKeeper(monitor, ctx, nets, rc["sigma_init"], text)
    ckpt.track("best", keeper)
    if ckpt.load_if_any(loop):
        ctx.log(f"{args.run}: resuming from {ckpt.path} at {loop.nimg / 1000:.2f} kimg")
    else:
        phases = ", ".join(f"{p['kind']} {p['kimg']:g} kimg" for p in rc["phases"])
        ctx.log(f"{args.run}: {phases}; batch {rc['batch']} ({loop.micro} x {loop.rounds} rounds x "
                f"{info.world_size} processes) on {info.device}")
    slow_precision = precision_warning(rc["precision"], info.device)
    if slow_precision:
        ctx.log(slow_precision)
    tracker = ctx.tracker("distill", run_name=args.run, resume_kimg=loop.nimg / 1000 if loop.nimg else None)
    grid = rc["grid_size"]

    def write_grid(path: Path) -> None:
        """Rank 0 writes the grid; a sharded G_ema samples it on every process (its forward is a collective)."""
        if info.is_main or sharded:
            images = grid_samples(nets.G_ema, grid, cfg["seed"], sigma_init=rc["sigma_init"], decode=decode,
                                  prompts=text and text[0])
        if info.is_main:
            save_grid(images, path, grid)

    def snapshot() -> None:
        write_grid(ctx.work / "samples.png")

    def on_tick(row: dict) -> None:
        with timings("evaluation"):
            scores = keeper.maybe_evaluate(loop.nimg, row["phase"])
        with timings("logging"):
            tracker.log({**row, **scores}, loop.nimg / 1000)

    watch = {"G": nets.G, "G_ema": nets.G_ema, "fake": nets.fake}
    if nets.head is not None:  # a DMD2 / ADD discriminator head (built by the loop) must stay finite too
        watch["head"] = nets.head
    run(loop, loop.total_nimg, rc["tick_kimg"], rc["snapshot_kimg"], ckpt, info, on_tick=on_tick,
        on_snapshot=snapshot, label=f"{args.run}: ", watch=watch, nonfinite_budget=rc["nonfinite_budget"],
        timings=timings)
    with timings("checkpoint"):  # the final writes, timed apart like the checkpoints
        # What is stored is whole: sharded networks are gathered on rank 0 (a collective).
        G, G_ema, fake, head = (consolidated_network(n) if sharded and n is not None else n
                                for n in (nets.G, nets.G_ema, nets.fake, nets.head))
        write_grid(ctx.out / "samples.png")
        if info.is_main:
            meta = {"stage": "distill", "run": args.run, "kimg": loop.nimg / 1000, "config_hash": ctx.cfg_hash,
                    "experiment": cfg["experiment"], "sigma_init": rc["sigma_init"], "gen_sigmas": rc["gen_sigmas"],
                    "method": loop.method_name, "ema": rc["ema"], "one_step": True}
            final = {"G": checkpoints.network_record(G), "G_ema": checkpoints.network_record(G_ema),
                     "fake": checkpoints.network_record(fake), "meta": meta}
            if head is not None:
                final["head"] = head_record(head)
            checkpoints.save_state(ctx.out / "state.pt", final)
            best = keeper.best_network()
            if best is not None:
                # The papers report their lowest-FID snapshot: network.pt is the best generator the
                # in-training metric saw, the final one stays as last.pt.
                checkpoints.save_network(ctx.out / "last.pt", G_ema, meta=meta)
                meta.update(selected=f"lowest {keeper.record['key']} during training", kimg=keeper.record["best_kimg"],
                            **{keeper.record["key"]: keeper.record["best"]})
                checkpoints.save_network(ctx.out / "network.pt", best, meta=meta)
                ctx.log(f"{args.run}: network.pt is the best generator ({keeper.record['key']} "
                        f"{keeper.record['best']:.4f} at {keeper.record['best_kimg']:.2f} kimg); "
                        "the final one is last.pt")
            else:
                checkpoints.save_network(ctx.out / "network.pt", G_ema, meta=meta)
    ctx.log(f"{args.run}: {timings.line()}")
    tracker.summary({"kimg": loop.nimg / 1000, **{f"time/{k}": v for k, v in timings.report().items()}})
    ctx.finish(tracker, ckpt, ctx.out / "network.pt")


if __name__ == "__main__":
    run_stage(main)
