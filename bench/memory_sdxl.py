"""Per-GPU memory of the SDXL presets at 8 / 16 / 64 GPUs, DDP against FSDP2, activation
checkpointing off and on, bf16: computed without a GPU.

    python -m bench.memory_sdxl --measure   # activations -> bench/data/sdxl_activations.json
    python -m bench.memory_sdxl --measure-add   # ADD-XL's others -> bench/data/sdxl_add_activations.json
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
- ADD-XL (add-xl-sdxl; bench.memory.add_passes, unet_copies): no fake score is trained or called,
  but the loop holds the clone `init_nets` makes for every method (weights only); G and the heads
  train (gradients, Adam); DINOv2 ViT-S/14 (224 px) is frozen and whole beside the text encoders
  and VAE. The generator half keeps G's forward, the VAE decoder's at 1024 px and DINOv2's (the
  adversarial gradient runs x_hat -> decode -> DINOv2 -> heads) and the heads'; the teacher's call
  is under no_grad. Decoder, DINOv2 and heads are not checkpointed; the decoder and DINOv2 are
  not sharded (their bf16 weight copies count under FSDP too), the heads are (as G). Measured
  (`measure_add`): the decoder at full width on latents 4x4, 16x16, 32x32 extrapolated to 128x128
  as the UNets; DINOv2 and the heads directly. The CPU's bf16 autocast keeps GroupNorm in bf16
  (CUDA's runs it in fp32), so the decoder's GPU bytes may be up to a third more.
- Not counted, as for SD: the CUDA context, fragmentation, kernel workspaces, DDP's buckets,
  SiDA's and DMD2's heads (small), temporaries of the EMA update, a backward's transient buffers
  (large for the decoder at 1024 px: a 128 x 1024 x 1024 gradient is 0.5 GB in fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import memory

GIB = 1024 ** 3
SDXL_PRESETS = ("sid-lsg-sdxl", "sida-sdxl", "dmd2-sdxl", "add-xl-sdxl")
ADD_NETS = ("decoder", "dinov2", "heads", "discriminator")  # bench.memory.add_passes' calls
WORLD_SIZES = (8, 16, 64)
ACTIVATIONS = memory.REPO / "bench" / "data" / "sdxl_activations.json"
ADD_ACTIVATIONS = memory.REPO / "bench" / "data" / "sdxl_add_activations.json"


def largest_unit(unet: torch.nn.Module) -> int:
    """Parameters of the largest FSDP unit of a diffusers UNet: a down / mid / up block, or the rest
    (the root's own parameters)."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return max(max(sizes), sum(p.numel() for p in unet.parameters()) - sum(sizes))


def call_bytes(acts: dict, pass_name: str, samples: float, parallel: str, checkpointing: bool) -> float:
    """Saved bytes (bf16) of one call of `samples` samples, and that call's recomputed block when
    its blocks are checkpointed: (kept, recomputed). ADD's networks (`ADD_NETS`) are not
    checkpointed; the decoder and DINOv2 are not sharded either (sida.train.sharding), so their
    weight copies count under FSDP too (the heads', sharded, are gathered in bf16 instead)."""
    if pass_name in ADD_NETS:
        entry = acts[f"bf16_{pass_name}"]
        whole = pass_name in ("decoder", "dinov2") or parallel == "ddp"
        return (entry["per_call"]["full"] if whole else 0.0) + samples * entry["per_sample"]["full"], 0.0
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
    unet, heads = params["unet"], params.get("heads", 0)  # ADD's heads: trained and sharded as G
    frozen_whole = sum(n for k, n in params.items() if k not in ("unet", "heads"))  # text encoders, VAE (, DINOv2)
    shard = world if parallel == "fsdp" else 1
    nets, n_trained = memory.unet_copies(rc)
    trained = n_trained * unet + heads
    bpp = rc["batch_per_proc"] or rc["batch"]

    def step_bytes(step: list) -> float:  # what every call keeps, plus one recomputed block at a time
        calls = [call_bytes(acts, name, bpp * n, parallel, checkpointing) for name, n in step]
        return sum(kept for kept, _ in calls) + max((r for _, r in calls), default=0.0)

    act = memory.peak_activations(rc, step_bytes)
    out = {"weights": 4 * ((nets * unet + heads) / shard + frozen_whole), "grads": 4 * trained / shard,
           "adam": 8 * trained / shard, "gathered": 8 * unit if parallel == "fsdp" else 0.0, "activations": act}
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


# --- ADD's networks ------------------------------------------------------------------------------

def add_run() -> dict:
    """The run config of add-xl-sdxl's ADD run."""
    from sida.run.config import load_config, run_config

    return run_config(load_config(memory.REPO / "config" / "add-xl-sdxl.yaml"), "add")


def add_networks(rc: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ADD run `rc`'s frozen DINOv2 feature network (random weights, no decoder) and its trained
    heads, as sida/train/methods/add.py builds them on SDXL: projected on c_text (the pooled
    embedding of the second text encoder) and c_img (DINOv2's class token), per `add_conditioning`."""
    from bench.sd_configs import CONFIGS
    from sida.nets.heads import add_heads_for
    from sida.nets.vit import DINOV2_RESOLUTION, DINOv2Features, build_dinov2

    spec, parts = rc["add_features"], rc["add_conditioning"] or ("text", "image")
    torch.manual_seed(0)
    features = DINOv2Features(build_dinov2(spec["arch"]), spec["layers"])
    cond_dim = ((CONFIGS["sdxl"]["text_encoder_2"]["projection_dim"] if "text" in parts else 0)
                + (features.embed_dim if "image" in parts else 0))
    heads = add_heads_for(features, (3, DINOV2_RESOLUTION, DINOV2_RESOLUTION), 0, rc["add_cmap_dim"], 0, "cpu",
                          cond_dim or None)
    return features, heads


def add_param_counts(rc: dict) -> dict[str, int]:
    """{'dinov2', 'heads'}: the parameters ADD run `rc` adds to the SDXL pipeline's."""
    return {k: sum(p.numel() for p in net.parameters()) for k, net in zip(("dinov2", "heads"), add_networks(rc))}


def add_saved(rc: dict, batch: int, precision: str, names: tuple[str, ...], latent_res: int = 0) -> dict[str, int]:
    """Saved-for-backward bytes of `batch` samples through each of ADD's networks `names` (of
    `ADD_NETS`), as add.py runs them: SDXL's VAE decoder (`PixelDecoder`) on latents of
    `latent_res` requiring grad; DINOv2 on 1024 px images requiring grad (its bicubic resize to
    224 px saves nothing); the heads on features requiring grad, with the hinge loss; the heads'
    update ('discriminator': hinge on real and generated images, R1 on the real ones' features)."""
    from diffusers import AutoencoderKL

    from bench.sd_configs import CONFIGS
    from sida.nets.vit import PixelDecoder
    from sida.train.baseline_losses import hinge_discriminator_loss, hinge_generator_loss
    from sida.train.methods.add import add_logits, add_real_logits_with_r1, real_features

    vae_cfg, calls = CONFIGS["sdxl"]["vae"], {}
    if "decoder" in names:
        decoder = PixelDecoder(AutoencoderKL(**vae_cfg), vae_cfg["scaling_factor"])
        z = torch.randn(batch, 4, latent_res, latent_res, requires_grad=True)
        calls["decoder"] = (decoder, lambda: decoder(z))
    if set(names) - {"decoder"}:
        features, heads = add_networks(rc)
        cond = torch.randn(batch, heads.init_kwargs["label_dim"])
        x = torch.rand(batch, 3, vae_cfg["sample_size"], vae_cfg["sample_size"]).mul(2).sub(1).requires_grad_(True)
        with torch.no_grad():
            feats = [f.requires_grad_(True) for f in features(x)]

        def critic() -> torch.Tensor:
            real, r1 = add_real_logits_with_r1(heads, real_features(features, x.detach(), None, False)[0], None, cond)
            return hinge_discriminator_loss(real, add_logits(features, heads, x.detach(), None, cond)) + r1

        calls.update({"dinov2": (features, lambda: features(x)), "discriminator": (heads, critic),
                      "heads": (heads, lambda: hinge_generator_loss(heads(feats, cond)))})
    out = {}
    for name in names:
        net, call = calls[name]
        with memory.SavedBytes(net.parameters()) as counter, torch.autocast("cpu", torch.bfloat16,
                                                                            enabled=precision == "bf16"):
            result = call()
        del result
        out[name] = counter.total
    return out


def measure_add(rc: dict, res: int = 128, small: tuple[int, ...] = (4, 16, 32)) -> dict:
    """Per-call and per-sample bytes of ADD's networks (`add_saved`), in bench.memory.measure's
    form: DINOv2 and the heads measured at their full size (batches 1 and 2, fp32 and bf16); the
    decoder as the UNets, fp32 at latents `small` extrapolated by the pixel count to `res`
    (SDXL's 128: 1024 px images), bf16 from the ratio at the smallest (bf16 convolutions are
    slow on this CPU: minutes at 8x8)."""
    import datetime
    import platform

    torch.set_num_threads(2)
    lo, rest, entry = min(small), ADD_NETS[1:], lambda fit, name: {part: {"full": fit[part][name]} for part in fit}
    dec32, dec16 = (memory.linear_fit(lambda b, p=p: add_saved(rc, b, p, ("decoder",), lo)) for p in ("fp32", "bf16"))
    points = {r: add_saved(rc, 1, "fp32", ("decoder",), r) for r in small}
    fp32, bf16 = memory.at_resolution(entry(dec32, "decoder"), entry(dec16, "decoder"),
                                      {r: {"full": v["decoder"]} for r, v in points.items()}, res)
    results = {"fp32_decoder": fp32, "bf16_decoder": bf16}
    fits = {p: memory.linear_fit(lambda b, p=p: add_saved(rc, b, p, rest)) for p in ("fp32", "bf16")}
    results.update({f"{p}_{name}": entry(fits[p], name) for name in rest for p in fits})
    return {"res": res, "small": list(small), "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU ({platform.node()}), 2 threads",
            "date": datetime.date.today().isoformat(), "command": "python -m bench.memory_sdxl --measure-add",
            "params": add_param_counts(rc), "bytes": results,
            "measured": {"decoder_fp32_fit": dec32, "decoder_bf16_fit": dec16, "decoder_fp32_batch1": points,
                         "fp32_fit": fits["fp32"], "bf16_fit": fits["bf16"]}}


def table(act_file: Path = ACTIVATIONS, add_file: Path = ADD_ACTIVATIONS) -> str:
    from sida.run.config import load_config

    acts = {**json.loads(act_file.read_text())["bytes"]["sdxl"], **json.loads(add_file.read_text())["bytes"]}
    sdxl = memory.param_counts("sdxl")
    unit = largest_unit(memory.build("sdxl")["unet"])

    def per_run(rc: dict) -> tuple:  # every (GPUs, parallel, act. ckpt) row of run config `rc`
        params = {**sdxl, **add_param_counts(rc)} if memory.is_add(rc) else sdxl
        return tuple((w, par, ck, tuple(per_gpu(params, unit, rc, acts, w, par, ck).values()))
                     for w in WORLD_SIZES for par in ("ddp", "fsdp") for ck in (False, True))

    keys = ("weights", "grads", "adam", "gathered", "activations", "total")
    rows = ["| preset | runs | per-GPU batch | GPUs | parallel | act. ckpt | " + " | ".join(keys) + " (GiB) |",
            "|---" * (6 + len(keys)) + "|"]
    for preset in SDXL_PRESETS:
        cfg = load_config(memory.REPO / "config" / f"{preset}.yaml")
        groups = memory.group_runs(cfg, lambda rc: (per_run(rc), rc["batch_per_proc"]))
        for (key, bpp), runs in groups.items():
            for w, par, ck, values in key:
                cells = [f"{v / GIB:.1f}" for v in values]
                rows.append(memory.markdown_row([preset, ", ".join(runs), str(bpp), str(w), par, "on" if ck else "off",
                                                 *cells]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--measure-add", action="store_true", help="ADD-XL's decoder, DINOv2 and heads -> "
                    "bench/data/sdxl_add_activations.json")
    ap.add_argument("--measure-one", nargs=3, metavar=("FIFTHS", "MODE", "SMALL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_one:
        fifths, mode, small = args.measure_one
        print(json.dumps(measure_one(int(fifths), mode, tuple(int(r) for r in small.split(",")))))
    elif args.measure_add:
        result = measure_add(add_run())
        ADD_ACTIVATIONS.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["bytes"], indent=1))
    elif args.measure:
        result = measure()
        ACTIVATIONS.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["bytes"], indent=1))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
