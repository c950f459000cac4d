"""Per-GPU memory of one training step of the text-to-image presets, computed without a GPU.

    python -m bench.memory --params            # parameter counts (networks built on the meta device)
    python -m bench.memory --measure [--res 64] # activations: one forward on the CPU, written to
                                                # bench/data/sd_activations.json (SDXL's: bench/memory_sdxl.py)
    python -m bench.memory --table              # the table of docs/memory.md, from the presets and that file

Parameters: the Stable Diffusion UNet, CLIP text encoder and VAE of each preset's teacher, built
from their public configs (bench/sd_configs.py) under ``torch.device("meta")``: no weights, no
download. Activations: MEASURED on the CPU as the bytes of every tensor autograd saves for the
backward pass during one UNet forward (a `saved_tensors_hooks` count of distinct storages, the
parameters themselves left out), for a trained UNet (parameters require grad, input does not) and
for a frozen one whose input requires grad (the teacher and the fake score inside SiD's generator
loss, whose gradient reaches x_g through them), with the encoder's share (up to the end of the mid
block: what SiDA's and DMD2's discriminators run). Saved bytes are per-call + batch x per-sample
(fitted from batches 1 and 2; per-call is bf16 autocast's weight copies). A 64x64 forward does
not fit this shared 23 GB CPU beside the weights, so fp32 per-sample bytes are measured at 8x8,
16x16 and 32x32 and extrapolated to the preset's 64x64 by a quadratic in the pixel count
(`extrapolate`); bf16 autocast (slow on the CPU) is measured at 8x8 and applied as the bf16 / fp32
ratio (`measure`). Both are estimates from measurements, not a 64x64 measurement. A step's activations: the calls alive together
in its larger half (generator or critic update, `passes`).

Weights are fp32 in both precisions (bf16 = autocast over fp32 master weights): the frozen teacher,
G, the fake score, G's EMA where the run keeps one, the text encoder and the VAE; gradients fp32 for
G and the fake score; Adam / AdamW two fp32 moments for each. Not counted: the CUDA context,
allocator fragmentation, kernel workspaces, DDP's gradient buckets, DMD2's small classifier head.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
ACTIVATIONS = REPO / "bench" / "data" / "sd_activations.json"
GIB = 1024 ** 3
TEXT_PRESETS = {"sid-lsg-sd15": "sd15", "sid-lsg-sd21base": "sd21base", "dmd2-sd15": "sd15", "sida-sd15": "sd15"}


def build(version: str, device: str = "meta") -> dict[str, torch.nn.Module]:
    """The UNet, text encoder(s) and VAE of `version` (a key of bench.sd_configs.CONFIGS) on `device`
    (SDXL's second text encoder, with its projection, as `text_encoder_2`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.sd_configs import CONFIGS

    cfg = CONFIGS[version]
    with torch.device(device):
        nets = {"unet": UNet2DConditionModel(**cfg["unet"]), "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))}
        if "text_encoder_2" in cfg:
            nets["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        nets["vae"] = AutoencoderKL(**cfg["vae"])
        return nets


def param_counts(version: str) -> dict[str, int]:
    return {name: sum(p.numel() for p in net.parameters()) for name, net in build(version).items()}


# --- activations -------------------------------------------------------------------------------

class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the context, parameters
    left out; `mark()` records the count so far (e.g. at the end of the encoder)."""

    def __init__(self, params) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.total = 0
        self.marks: list[int] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return t

    def mark(self, *_args) -> None:
        self.marks.append(self.total)

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def measure_unet(unet: torch.nn.Module, batch: int, res: int, text_dim: int, precision: str,
                 frozen: bool) -> dict[str, int]:
    """Saved-for-backward bytes of one UNet forward of `batch` samples: {'full', 'encoder' (up to the
    end of the mid block), 'max_block' (the largest of one down / mid / up block), 'outside_blocks'
    (the embeddings, conv_in / conv_out), 'block_inputs' (the distinct tensors those blocks take,
    skip connections included: what activation checkpointing of the blocks keeps)}."""
    for p in unet.parameters():
        p.requires_grad_(not frozen)
    x = torch.randn(batch, 4, res, res, requires_grad=frozen)
    t = torch.full((batch,), 625)
    text = torch.randn(batch, 77, text_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the six time_ids
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, unet.config.projection_class_embeddings_input_dim
                                                                 - 6 * unet.config.addition_time_embed_dim),
                                      "time_ids": torch.tensor([[8.0 * res, 8.0 * res, 0, 0, 8.0 * res, 8.0 * res]] * batch)}
    counter = SavedBytes(unet.parameters())
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]  # sida.train.sharding's FSDP units
    inputs: dict[int, int] = {}  # storage -> bytes of every block's tensor inputs (skip connections included)
    spans: list[int] = []

    def pre(_module, args, kwargs) -> None:
        for v in [*args, *kwargs.values()]:
            for t in (v if isinstance(v, tuple) else (v,)):
                if isinstance(t, torch.Tensor):
                    inputs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        spans.append(counter.total)

    def post(*_args) -> None:
        spans.append(counter.total - spans.pop())

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True), b.register_forward_hook(post))]
    hooks.append(unet.mid_block.register_forward_hook(lambda *a: counter.mark()))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        with counter, autocast:
            out = unet(x, t, encoder_hidden_states=text, **extra).sample
    finally:
        for h in hooks:
            h.remove()
    del out
    return {"full": counter.total, "encoder": counter.marks[0], "max_block": max(spans),
            "outside_blocks": counter.total - sum(spans), "block_inputs": sum(inputs.values())}


def linear_fit(saved: Callable[[int], dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per-sample bytes (slope) and per-call bytes (intercept: bf16 autocast's weight copies) from
    `saved(batch)` at batches 1 and 2."""
    one, two = saved(1), saved(2)
    return {"per_sample": {k: two[k] - one[k] for k in one}, "per_call": {k: 2 * one[k] - two[k] for k in one}}


def at_resolution(fit32: dict, fit16: dict, points: dict[int, dict[str, int]], res: int) -> tuple[dict, dict]:
    """(fp32, bf16) {'per_sample', 'per_call'} at `res`: fp32 per-sample bytes are the batch-1
    `points` {r: bytes} less fp32's per-call bytes, extrapolated (`extrapolate`); bf16's are those
    times the bf16 / fp32 per-sample ratio of the fits (made at the smallest resolution)."""
    per32 = {k: round(extrapolate({r: v[k] - fit32["per_call"][k] for r, v in points.items()}, res))
             for k in fit32["per_call"]}
    bf16 = {k: round(per32[k] * fit16["per_sample"][k] / fit32["per_sample"][k]) for k in per32}
    return {"per_sample": per32, "per_call": fit32["per_call"]}, {"per_sample": bf16, "per_call": fit16["per_call"]}


def extrapolate(points: dict[int, float], res: int) -> float:
    """The quadratic in the pixel count n = r^2 through three (r, bytes) points, at `res`:
    c0 (per-sample bytes of the text and time embeddings) + c1 n (convolutions, norms, attention
    kernels that save O(n)) + c2 n^2 (attention matrices, where a kernel saves them)."""
    import numpy as np

    rs = sorted(points)
    a = np.array([[1.0, r * r, float(r) ** 4] for r in rs])
    c = np.linalg.solve(a, np.array([points[r] for r in rs], dtype=float))
    return float(c[0] + c[1] * res * res + c[2] * float(res) ** 4)


def measure(res: int = 64, small: tuple[int, ...] = (8, 16, 32)) -> dict:
    """Per-call and per-sample saved bytes at `res`. fp32: per-sample bytes measured at batch 1 at
    the `small` resolutions (less the per-call bytes of a batch-1/2 fit at the smallest) and
    extrapolated to `res` (`extrapolate`). bf16 autocast (slow on the CPU): per-call bytes from the
    batch-1/2 fit at the smallest resolution; per-sample bytes = fp32's at `res` x the bf16 / fp32
    ratio of per-sample bytes there."""
    import subprocess

    results, raw = {}, {}
    for version in ("sd15", "sd21base"):  # SDXL's: bench/memory_sdxl.py
        for mode in ("trained", "frozen"):
            # one process per network and mode: the CPU allocator keeps what a forward freed
            out = subprocess.run([sys.executable, "-m", "bench.memory", "--measure-one", version, mode,
                                  "--small", ",".join(map(str, small))], check=True, capture_output=True, text=True,
                                 cwd=REPO)
            fit32, fit16, points = json.loads(out.stdout.strip().splitlines()[-1])
            fp32, bf16 = at_resolution(fit32, fit16, {int(r): v for r, v in points.items()}, res)
            results.setdefault(version, {}).update({f"fp32_{mode}": fp32, f"bf16_{mode}": bf16})
            raw.setdefault(version, {})[mode] = {"fp32_fit": fit32, "bf16_fit": fit16, "fp32_batch1": points}
    return {"res": res, "small": list(small), "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU ({platform.node()}), 2 threads",
            "date": datetime.date.today().isoformat(), "command": f"python -m bench.memory --measure --res {res}",
            "bytes": results, "measured": raw}


def measure_one(version: str, mode: str, small: tuple[int, ...]) -> list:
    from bench.sd_configs import CONFIGS

    torch.manual_seed(0)
    return fits(build(version, "cpu")["unet"], CONFIGS[version]["unet"]["cross_attention_dim"], mode == "frozen", small)


def fits(unet: torch.nn.Module, text_dim: int, frozen: bool, small: tuple[int, ...]) -> list:
    """[fp32 batch-1/2 fit, bf16 batch-1/2 fit] at the smallest of `small`, and {res: fp32 batch-1 bytes}."""
    lo = min(small)
    fit32, fit16 = (linear_fit(lambda b, p=p: measure_unet(unet, b, lo, text_dim, p, frozen)) for p in ("fp32", "bf16"))
    return [fit32, fit16, {r: measure_unet(unet, 1, r, text_dim, "fp32", frozen) for r in small}]


# --- a training step ----------------------------------------------------------------------------

def passes(rc: dict, kind: str) -> dict[str, list[tuple[str, float]]]:
    """The forwards whose saved tensors are alive together in each half of one iteration of phase
    `kind` (as sida/train/methods run them): {step: [(pass, samples per batch sample)]}, a pass
    being 'trained' (parameters train), 'frozen' (input requires grad) or its '_encoder' share.
    A guided call runs the conditional and the empty prompt as one pass of twice the batch."""
    g = lambda scale: 2.0 if scale != 1 else 1.0  # noqa: E731
    if is_add(rc):
        return add_passes(rc, kind)
    if kind in ("sid", "sida", "warmup"):
        gen = [("trained", 1.0), ("frozen", g(rc["guidance_teacher"])), ("frozen", g(rc["guidance_fake"]))]
        critic = [("trained", g(rc["guidance_fake_train"]))]
        if rc["discriminator"]:
            # SiDA: the fake score's encoder judges real and generated images (one pass of 2b; the
            # unguided path decodes only the generated half, which its full pass above counts)
            critic.append(("trained_encoder", 2.0 if rc["guidance_fake_train"] != 1 else 1.0))
        if kind == "warmup":
            gen = []
        return {"generator": gen, "critic": critic}
    if kind in ("dmd", "dmd2"):
        gan = kind == "dmd2"
        return {"generator": [("trained", 1.0)] + ([("frozen_encoder", 1.0)] if gan else []),
                "critic": [("trained", 1.0)] + ([("trained_encoder", 2.0)] if gan else [])}
    raise ValueError(f"no memory model for phase kind {kind!r}")


def is_add(rc: dict) -> bool:
    """Whether run config `rc` is an ADD run (its phases `add`, and `warmup` besides)."""
    return any(p["kind"] == "add" for p in rc["phases"])


def add_passes(rc: dict, kind: str) -> dict[str, list[tuple[str, float]]]:
    """`passes` of an ADD run (sida/train/methods/add.py), on a latent teacher with DINOv2 features.
    No fake score; the teacher's call is under no_grad (it saves nothing). The generator half keeps
    G's forward and, with the discriminator, the frozen VAE decoder's and DINOv2's (the adversarial
    gradient reaches x_hat through them: 'decoder', 'dinov2') and the heads' ('heads'). The heads'
    half decodes and runs DINOv2 without a graph (real images under no_grad, the detached x_hat
    with nothing requiring grad), so it keeps the heads' calls on real and generated features and
    R1's double-backward graph ('discriminator')."""
    if rc["discriminator"] != "add":
        return {"generator": [] if kind == "warmup" else [("trained", 1.0)], "critic": []}
    if rc["add_features"]["kind"] != "dinov2":
        raise ValueError(f"no memory model for ADD features {rc['add_features']['kind']!r} (DINOv2 only)")
    gen = [] if kind == "warmup" else [("trained", 1.0), ("decoder", 1.0), ("dinov2", 1.0), ("heads", 1.0)]
    return {"generator": gen, "critic": [("discriminator", 1.0)]}


def unet_copies(rc: dict) -> tuple[int, int]:
    """(UNet copies a process holds, copies trained) in run `rc`: the teacher, G, the fake score and
    G's EMA where the run keeps one; G and the fake score train. ADD trains G alone; its fake score
    is still held: `init_nets` clones it from the teacher for every method (never called in ADD)."""
    held = 3 + (1 if rc["ema"] else 0)
    return held, 1 if is_add(rc) else 2


def call_bytes(acts: dict, precision: str, pass_name: str, samples: float) -> float:
    """Saved bytes of one network call of `samples` samples: per-call + samples x per-sample."""
    kind, _, part = pass_name.partition("_")
    entry, key = acts[f"{precision}_{kind}"], "encoder" if part == "encoder" else "full"
    return entry["per_call"][key] + samples * entry["per_sample"][key]


def peak_activations(rc: dict, step_bytes) -> float:
    """The largest `step_bytes(calls)` over the update halves of every phase of run config `rc`
    (`passes`: the calls alive together in one half, as (name, samples per sample of the batch))."""
    return max((step_bytes(step) for phase in rc["phases"] for step in passes(rc, phase["kind"]).values()),
               default=0.0)


def step_memory(params: dict[str, int], rc: dict, acts: dict, precision: str) -> dict[str, float]:
    """Bytes per GPU of one iteration of run config `rc` (its largest phase) at its per-GPU batch."""
    unet = params["unet"]
    nets, n_trained = unet_copies(rc)  # discriminator heads not counted
    trained = n_trained * unet
    weights = 4 * (nets * unet + params["text_encoder"] + params["vae"])
    bpp = rc["batch_per_proc"] or rc["batch"]
    act = peak_activations(rc, lambda step: sum(call_bytes(acts, precision, name, bpp * n) for name, n in step))
    out = {"weights": weights, "grads": 4 * trained, "adam": 8 * trained, "activations": act}
    out["total"] = sum(out.values())
    return out


def group_runs(cfg: dict, key) -> dict[tuple, list[str]]:
    """The runs of `cfg` grouped by `key(run config)`: runs with the same numbers share a table row."""
    from sida.run.config import run_config

    groups: dict[tuple, list[str]] = {}
    for run in cfg["distill"]["runs"]:
        groups.setdefault(key(run_config(cfg, run)), []).append(run)
    return groups


def markdown_row(cells: list[str]) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def table(act_file: Path = ACTIVATIONS) -> str:
    from sida.run.config import load_config

    data = json.loads(act_file.read_text())
    acts = data["bytes"]
    rows = ["| preset | run | teacher | UNet / text / VAE params | per-GPU batch | precision | weights | grads | Adam | "
            "activations | total (GiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, version in TEXT_PRESETS.items():
        cfg = load_config(REPO / "config" / f"{preset}.yaml")
        params = param_counts(version)
        counts = " / ".join(f"{params[k] / 1e6:.1f}M" for k in ("unet", "text_encoder", "vae"))
        groups = group_runs(cfg, lambda rc: (
            tuple(tuple(step_memory(params, rc, acts[version], p).items()) for p in ("fp32", "bf16")),
            rc["batch_per_proc"], rc["precision"]))
        for (ms, bpp, own), runs in groups.items():
            for precision, m in zip(("fp32", "bf16"), map(dict, ms)):
                cells = [f"{m[k] / GIB:.1f}" for k in ("weights", "grads", "adam", "activations", "total")]
                if precision == own:
                    cells[-1] = f"**{cells[-1]}**"
                rows.append(markdown_row([preset, ", ".join(runs), version, counts, str(bpp), precision, *cells]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", action="store_true")
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--measure-one", nargs=2, metavar=("VERSION", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--small", default="8,16,32")
    args = ap.parse_args(argv)
    if args.params:
        from bench.sd_configs import CONFIGS
        for version in CONFIGS:
            print(version, json.dumps(param_counts(version)))
    small = tuple(int(r) for r in args.small.split(","))
    if args.measure_one:
        torch.set_num_threads(2)
        print(json.dumps(measure_one(*args.measure_one, small)))
    if args.measure:
        result = measure(args.res, small)
        ACTIVATIONS.parent.mkdir(exist_ok=True)
        ACTIVATIONS.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    if args.table:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
