"""Per-GPU memory of the SDXL presets at 8 / 16 / 64 GPUs, DDP against FSDP2, activation
checkpointing off and on, bf16: computed without a GPU.

    python -m bench.memory_sdxl --measure   # activations -> bench/data/sdxl_activations.json
    python -m bench.memory_sdxl             # the SDXL table of docs/memory.md

Parameters: SDXL base 1.0's UNet, two text encoders and VAE from their public configs
(bench/sd_configs.py) on the meta device. Activations: measured as bench.memory's docstring says
for SD (saved-for-backward bytes on the CPU at 8x8, 16x16, 32x32 latents, extrapolated by the
quadratic in the pixel count to SDXL's 128x128; bf16 from the bf16 / fp32 ratio at 8x8), with the
blocks' shares (`bench.memory.measure_unet`), on SDXL's UNet at 1/5 and 2/5 of its width (channels
and attention heads; head size 64 kept): SDXL's 10 GB of fp32 weights do not fit this shared 23 GB
CPU beside a forward. Saved bytes are linear in the width (every saved tensor has the channels as
a factor but the text embedding each cross-attention takes, the same at every width: 2/5 gives
2.0x 1/5's bytes, the block inputs 1/5's plus that constant), so full width = w1 + 4 (w2 - w1)
(`widen`); per-call bytes (autocast's weight copies) scale with the parameter count.
Assumptions, each a choice of this model:

- bf16 = fp32 master parameters with bf16 compute (autocast under DDP; FSDP2's
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) under FSDP, sida/train/sharding.py).
- DDP: every GPU holds the teacher, G, the fake score and G's EMA (fp32), fp32 gradients of G and
  the fake score and two fp32 Adam moments of each; autocast's bf16 weight copies per network call
  (the measured per-call bytes).
- FSDP2: those four UNets, the gradients and the Adam moments divided by the world size (the frozen
  teacher sharded too); the text encoders and the VAE (frozen, outside the shards) whole on every
  GPU in fp32. A gathered unit adds its full parameters in bf16 plus, in the backward, its
  unsharded gradient in bf16 and the fp32 copy reduce-scattered: 8 bytes a parameter for the
  largest unit (sida.train.sharding's units: each down / mid / up block and the root's rest), one
  unit at a time (FSDP2's prefetch of the next unit would add a second: not counted). No per-call
  weight copies (the gathered parameters already are bf16).
- Activations: the calls alive together in the larger half of an iteration (bench.memory.passes).
  Without checkpointing: the measured per-sample bytes. With checkpointing of the same blocks
  (activation checkpointing of every network, which the loop does not offer yet): per call, what the root saves (`outside_blocks`) plus the
  blocks' inputs (`block_inputs`, skip connections included) per sample, plus one block's
  recomputed activations (`max_block` of the largest call) during the backward; an encoder-only
  call (the discriminators) scaled by its measured encoder / full ratio. Under DDP the per-call
  weight copies are counted as without checkpointing (an upper bound).
- Not counted, as for SD: the CUDA context, fragmentation, kernel workspaces, DDP's buckets,
  the heads (small), temporaries of the EMA update.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import memory

GIB = 1024 ** 3
SDXL_PRESETS = ("sid-lsg-sdxl", "sida-sdxl", "dmd2-sdxl")
WORLD_SIZES = (8, 16, 64)
ACTIVATIONS = memory.REPO / "bench" / "data" / "sdxl_activations.json"


def largest_unit(unet: torch.nn.Module) -> int:
    """Parameters of the largest FSDP unit of a diffusers UNet: a down / mid / up block, or the rest
    (the root's own parameters)."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return max(max(sizes), sum(p.numel() for p in unet.parameters()) - sum(sizes))


def call_bytes(acts: dict, pass_name: str, samples: float, parallel: str, checkpointing: bool) -> float:
    """Saved bytes (bf16) of one call of `samples` samples, and that call's recomputed block when
    its blocks are checkpointed: (kept, recomputed)."""
    kind, _, part = pass_name.partition("_")
    entry = acts[f"bf16_{kind}"]
    per, copies = entry["per_sample"], entry["per_call"]["encoder" if part else "full"]
    scale = per["encoder"] / per["full"] if part else 1.0
    fixed = copies if parallel == "ddp" else 0.0
    if not checkpointing:
        return fixed + samples * scale * per["full"], 0.0
    kept = samples * scale * (per["outside_blocks"] + per["block_inputs"])
    return fixed + kept, samples * per["max_block"]


def per_gpu(params: dict[str, int], unit: int, rc: dict, acts: dict, world: int, parallel: str,
            checkpointing: bool) -> dict[str, float]:
    """Bytes per GPU of one iteration of run config `rc` (its largest phase, bf16) on `world` GPUs."""
    unet = params["unet"]
    frozen_whole = sum(n for k, n in params.items() if k != "unet")  # text encoders, VAE
    shard = world if parallel == "fsdp" else 1
    nets = 3 + (1 if rc["ema"] else 0)
    bpp = rc["batch_per_proc"] or rc["batch"]

    def step_bytes(step: list) -> float:  # what every call keeps, plus one recomputed block at a time
        calls = [call_bytes(acts, name, bpp * n, parallel, checkpointing) for name, n in step]
        return sum(kept for kept, _ in calls) + max((r for _, r in calls), default=0.0)

    act = memory.peak_activations(rc, step_bytes)
    out = {"weights": 4 * (nets * unet / shard + frozen_whole), "grads": 4 * 2 * unet / shard,
           "adam": 8 * 2 * unet / shard, "gathered": 8 * unit if parallel == "fsdp" else 0.0, "activations": act}
    out["total"] = sum(out.values())
    return out


def thin_unet(fifths: int) -> torch.nn.Module:
    """SDXL's UNet at `fifths`/5 of its channels and attention heads, on the CPU."""
    from diffusers import UNet2DConditionModel

    from bench.sd_configs import CONFIGS

    cfg = dict(CONFIGS["sdxl"]["unet"])
    cfg["block_out_channels"] = [c * fifths // 5 for c in cfg["block_out_channels"]]
    cfg["attention_head_dim"] = [h * fifths // 5 for h in cfg["attention_head_dim"]]
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg)


def widen(one: float, two: float) -> float:
    """The width-linear bytes a + b w through w = 1 (1/5 width) and w = 2, at full width w = 5."""
    return one + 4 * (two - one)


def measure(res: int = 128, small: tuple[int, ...] = (8, 16, 32)) -> dict:
    """bench.memory.measure's numbers for SDXL at `res`, from the 1/5 and 2/5 width UNets."""
    import datetime
    import platform
    import subprocess

    params = memory.param_counts("sdxl")["unet"]
    results, raw = {}, {}
    for mode in ("trained", "frozen"):
        runs = []
        for fifths in (1, 2):  # one process each: the CPU allocator keeps what a forward freed
            out = subprocess.run([sys.executable, "-m", "bench.memory_sdxl", "--measure-one", str(fifths), mode,
                                  ",".join(map(str, small))], check=True, capture_output=True, text=True, cwd=memory.REPO)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        (f32a, f16a, pa, na), (f32b, f16b, pb, nb) = runs
        keys = list(f32a["per_call"])
        fit32 = {part: {k: widen(f32a[part][k], f32b[part][k]) for k in keys} for part in f32a}
        fit16 = {part: {k: widen(f16a[part][k], f16b[part][k]) for k in keys} for part in f16a}
        points = {int(r): {k: widen(pa[r][k], pb[r][k]) - fit32["per_call"][k] for k in keys} for r in pa}
        per32 = {k: round(memory.extrapolate({r: v[k] for r, v in points.items()}, res)) for k in keys}
        copies = params / na  # per-call bytes: autocast's weight copies, in proportion to the parameters
        results[f"fp32_{mode}"] = {"per_sample": per32, "per_call": {k: 0 for k in keys}}
        results[f"bf16_{mode}"] = {"per_sample": {k: round(per32[k] * fit16["per_sample"][k] / fit32["per_sample"][k])
                                                  for k in keys},
                                   "per_call": {k: round(f16a["per_call"][k] * copies) for k in keys}}
        raw[mode] = {"fifths_1": runs[0], "fifths_2": runs[1]}
    return {"res": res, "small": list(small), "torch": torch.__version__, "widths": "1/5, 2/5",
            "machine": f"{platform.machine()} CPU ({platform.node()}), 2 threads",
            "date": datetime.date.today().isoformat(), "command": "python -m bench.memory_sdxl --measure",
            "bytes": {"sdxl": results}, "measured": raw}


def measure_one(fifths: int, mode: str, small: tuple[int, ...]) -> list:
    torch.set_num_threads(2)
    unet = thin_unet(fifths)
    out = memory.fits(unet, 2048, mode == "frozen", small)
    return [*out, sum(p.numel() for p in unet.parameters())]


def table(act_file: Path = ACTIVATIONS) -> str:
    from sida.run.config import load_config

    acts = json.loads(act_file.read_text())["bytes"]["sdxl"]
    params = memory.param_counts("sdxl")
    unit = largest_unit(memory.build("sdxl")["unet"])
    keys = ("weights", "grads", "adam", "gathered", "activations", "total")
    rows = ["| preset | runs | per-GPU batch | GPUs | parallel | act. ckpt | " + " | ".join(keys) + " (GiB) |",
            "|---" * (6 + len(keys)) + "|"]
    for preset in SDXL_PRESETS:
        cfg = load_config(memory.REPO / "config" / f"{preset}.yaml")
        groups = memory.group_runs(cfg, lambda rc: (
            tuple((w, par, ck, tuple(per_gpu(params, unit, rc, acts, w, par, ck).values()))
                  for w in WORLD_SIZES for par in ("ddp", "fsdp") for ck in (False, True)), rc["batch_per_proc"]))
        for (key, bpp), runs in groups.items():
            for w, par, ck, values in key:
                cells = [f"{v / GIB:.1f}" for v in values]
                rows.append(f"| {preset} | {', '.join(runs)} | {bpp} | {w} | {par} | {'on' if ck else 'off'} | "
                            + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--measure-one", nargs=3, metavar=("FIFTHS", "MODE", "SMALL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_one:
        fifths, mode, small = args.measure_one
        print(json.dumps(measure_one(int(fifths), mode, tuple(int(r) for r in small.split(",")))))
    elif args.measure:
        result = measure()
        ACTIVATIONS.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["bytes"], indent=1))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
