"""Per-GPU memory of the SDXL presets at 8 / 16 / 64 GPUs, DDP against FSDP2, activation
checkpointing off and on, bf16: computed without a GPU.

    python -m bench.memory --measure --res 128 --versions sdxl   # activations -> bench/data/sdxl_activations.json
    python -m bench.memory_sdxl                                  # the SDXL table of docs/memory.md

Parameters: SDXL base 1.0's UNet, two text encoders and VAE from their public configs
(bench/sd_configs.py) on the meta device. Activations: measured as bench.memory's docstring says
for SD (saved-for-backward bytes on the CPU at 8x8, 16x16, 32x32 latents, extrapolated by the
quadratic in the pixel count to SDXL's 128x128; bf16 from the bf16 / fp32 ratio at 8x8), with the
blocks' shares (`bench.memory.measure_unet`). Assumptions, each a choice of this model:

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
  (`activation_checkpointing: true`): per call, what the root saves (`outside_blocks`) plus the
  blocks' inputs (`block_inputs`, skip connections included) per sample, plus one block's
  recomputed activations (`max_block` of the largest call) during the backward; an encoder-only
  call (the discriminators) scaled by its measured encoder / full ratio. Under DDP the per-call
  weight copies are counted as without checkpointing (an upper bound).
- Not counted, as for SD: the CUDA context, fragmentation, kernel workspaces, DDP's buckets,
  the heads (small), temporaries of the EMA update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench import memory

GIB = 1024 ** 3
SDXL_PRESETS = ("sid-lsg-sdxl", "sida-sdxl", "dmd2-sdxl")
WORLD_SIZES = (8, 16, 64)


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
    act = 0.0
    for phase in rc["phases"]:
        for step in memory.passes(rc, phase["kind"]).values():
            calls = [call_bytes(acts, name, bpp * n, parallel, checkpointing) for name, n in step]
            act = max(act, sum(kept for kept, _ in calls) + max((r for _, r in calls), default=0.0))
    out = {"weights": 4 * (nets * unet / shard + frozen_whole), "grads": 4 * 2 * unet / shard,
           "adam": 8 * 2 * unet / shard, "gathered": 8 * unit if parallel == "fsdp" else 0.0, "activations": act}
    out["total"] = sum(out.values())
    return out


def table(act_file: Path = memory.SDXL_ACTIVATIONS) -> str:
    from sida.run.config import load_config, run_config

    acts = json.loads(act_file.read_text())["bytes"]["sdxl"]
    params = memory.param_counts("sdxl")
    unit = largest_unit(memory.build("sdxl")["unet"])
    keys = ("weights", "grads", "adam", "gathered", "activations", "total")
    rows = ["| preset | runs | per-GPU batch | GPUs | parallel | act. ckpt | " + " | ".join(keys) + " (GiB) |",
            "|---" * (6 + len(keys)) + "|"]
    for preset in SDXL_PRESETS:
        cfg = load_config(memory.REPO / "config" / f"{preset}.yaml")
        groups: dict[tuple, list[str]] = {}
        for run in cfg["distill"]["runs"]:
            rc = run_config(cfg, run)
            key = tuple((w, par, ck, tuple(per_gpu(params, unit, rc, acts, w, par, ck).values()))
                        for w in WORLD_SIZES for par in ("ddp", "fsdp") for ck in (False, True))
            groups.setdefault((key, rc["batch_per_proc"]), []).append(run)
        for (key, bpp), runs in groups.items():
            for w, par, ck, values in key:
                cells = [f"{v / GIB:.1f}" for v in values]
                rows.append(f"| {preset} | {', '.join(runs)} | {bpp} | {w} | {par} | {'on' if ck else 'off'} | "
                            + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
