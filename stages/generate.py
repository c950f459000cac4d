"""Stage `generate`: samples from a network file → a PNG grid and an .npz (uint8 NHWC + labels).

    python -m stages.generate --network results/digits/sid/network.pt --out results/digits/sid/gen \
        [--num 1000] [--seed 0] [--steps 1] [--class 3]
    torchrun --standalone --nproc-per-node N -m stages.generate ...

Distilled generators (written by the distill stage) sample in one step at the generation sigma
their file records (SiD family 2.5, DMD2 80, ADD 80), ADD's also in `--steps` 2 to 4 (its student
levels, re-noised in between); any other network (a teacher) is sampled with EDM's Heun sampler,
`--steps` steps (default 18 = 35 NFE).
Sample i always comes from seed `--seed + i`, whatever the process count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sida.io import checkpoints
from sida.run import dist
from sida.io.atomic import atomic_write
from sida.run.cli import run_stage
from sida.errors import ConfigError
from sida.io.images import save_grid, to_uint8
from sida.eval.sampling import generator_sigmas, sample
from sida.nets.sampler import sampling_sigmas


def seeded_latents(net: torch.nn.Module, seeds: Sequence[int], device: torch.device,
                   class_idx: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, one-hot labels) with sample i drawn from its own seed, so results do not depend on
    batching or the number of processes."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    zs, ls = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        zs.append(torch.randn(shape, generator=g))
        if net.label_dim:
            c = class_idx if class_idx is not None else int(torch.randint(net.label_dim, (1,), generator=g))
            ls.append(F.one_hot(torch.tensor(c), net.label_dim).float())
    z = torch.stack(zs).to(device)
    labels = torch.stack(ls).to(device) if ls else torch.zeros([len(zs), 0], device=device)
    return z, labels


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.split("\n")[0])
    p.add_argument("--network", required=True, help="network file (ours): a distilled generator or a teacher")
    p.add_argument("--out", required=True, help="output directory: samples.png and samples.npz")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps: distilled generators 1 (default) or, for ADD, up to its student levels; "
                        "teachers Heun steps (default 18)")
    p.add_argument("--sigma-init", type=float, default=None,
                   help="one-step sigma of a distilled generator (default: from the network file, else 2.5)")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="generate one class only")
    p.add_argument("--batch", type=int, default=256, help="samples per forward pass per process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.num < 1 or args.batch < 1:
        raise ConfigError(f"--num and --batch must be at least 1 (got {args.num} and {args.batch})")
    info = dist.init(args.device)
    net = checkpoints.load_network(args.network, info.device)
    meta = getattr(net, "sida_meta", {})
    one_step = bool(meta.get("one_step"))
    steps = args.steps or (1 if one_step else 18)
    sigmas = None
    if one_step:
        levels = [args.sigma_init] if args.sigma_init else generator_sigmas(net)
        try:
            sigmas = sampling_sigmas(levels, steps)
        except ValueError as exc:
            raise ConfigError(f"--steps {steps}: {exc}") from None
    if args.class_idx is not None and not 0 <= args.class_idx < net.label_dim:
        raise ConfigError(f"--class {args.class_idx} is out of range: the network has {net.label_dim} classes")
    # Each rank takes every world_size-th seed; rank 0 gathers and restores the seed order.
    seeds = list(range(args.seed + info.rank, args.seed + args.num, info.world_size))
    z, labels = seeded_latents(net, seeds, info.device, args.class_idx)
    images = to_uint8(sample(net, z, labels, steps=steps, batch=args.batch, sigmas=sigmas))
    parts = dist.gather_objects((seeds, images, labels.argmax(1).cpu().numpy() if net.label_dim else None))
    if info.is_main:
        order = np.argsort(np.concatenate([np.asarray(s) for s, _, _ in parts]), kind="stable")
        all_images = np.concatenate([im for _, im, _ in parts])[order]
        all_labels = (np.concatenate([lb for _, _, lb in parts])[order] if net.label_dim
                      else np.zeros([args.num], dtype=np.int64) - 1)
        out = Path(args.out)
        cols = int(np.ceil(np.sqrt(min(args.num, 256))))
        save_grid(all_images[:cols * cols], out / "samples.png", cols)
        with atomic_write(out / "samples.npz", suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=all_images, labels=all_labels, seeds=np.arange(args.seed, args.seed + args.num))
        kind = (f"{steps} step{'s' if steps > 1 else ''} at sigma {', '.join(f'{x:.4g}' for x in sigmas)}" if sigmas
                else f"{steps} Heun steps ({2 * steps - 1} NFE)")
        print(f"generate: {args.num} samples ({kind}) -> {out / 'samples.npz'}, {out / 'samples.png'}",
              file=sys.stderr)
    dist.shutdown()


if __name__ == "__main__":
    run_stage(main)
