"""Benchmark: our batched feature path vs clean-fid's `compute_fid(gen=...)` on the same generator.

    python -m bench.fid [--extractor inception-random|inception|digits_classifier] [--weights PATH]
                        [--mode clean|legacy_tensorflow] [--num 64] [--refs 64] [--batch 32]
                        [--network PATH] [--device auto|cpu|cuda]

Both paths see the same images: a one-step generator (a random EDMPrecond, or --network) fed
clean-fid's latents (torch.manual_seed, then randn(batch, z_dim) per batch), quantised to uint8
as EDM does; the reference is the same set of dataset images (written as .npy for clean-fid's
folder reader). clean-fid gets the same network through `custom_feat_extractor` (for Inception:
clean-fid's own `InceptionV3W` loading our local file, download=False), so nothing is downloaded.
`inception-random` writes a randomly initialised Inception-v3 of the real architecture, for
offline runs: speeds are real, FIDs are not. Prints images/s of both paths and both FIDs (they
must agree to 1e-3); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _log(msg: str) -> None:
    print(f"[bench.fid] {msg}", file=sys.stderr, flush=True)


def _generator(args: argparse.Namespace, res: int, ch: int, device: torch.device) -> torch.nn.Module:
    from sida.io.checkpoints import load_network
    from sida.nets.precond import EDMPrecond

    if args.network:
        return load_network(args.network, device)
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=res, img_channels=ch, label_dim=0, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    return net.to(device).eval().requires_grad_(False)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the result dict (also printed as the last line)."""
    p = argparse.ArgumentParser(prog="python -m bench.fid", description=__doc__.split("\n")[0])
    p.add_argument("--extractor", default="inception-random", choices=["inception-random", "inception", "digits_classifier"])
    p.add_argument("--weights", default=None, help="local inception-2015-12-05.pt (for --extractor inception)")
    p.add_argument("--mode", default="clean", choices=["clean", "legacy_tensorflow"])
    p.add_argument("--num", type=int, default=64, help="generated images")
    p.add_argument("--refs", type=int, default=64, help="reference images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--network", default=None, help="a one-step generator network file (default: random)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num % args.batch:
        p.error("--num must be a multiple of --batch (clean-fid generates whole batches)")

    from cleanfid import fid as cfid

    from sida.io.data import open_dataset
    from sida.run.dist import pick_device
    from sida.eval.features import (INCEPTION_FILE, InceptionExtractor, load_or_train_digits_classifier,
                                    make_random_inception_file)
    from sida.eval.metrics import fd_from_features
    from sida.io.images import quantize
    from sida.nets.sampler import one_step_generate

    device = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fid-"))
    digits = args.extractor == "digits_classifier"
    mode = "legacy_tensorflow" if digits else args.mode  # the classifier takes 8x8 as is: no resize
    if digits:
        ext = load_or_train_digits_classifier(tmp / "cache", device=device)
        res, ch = 8, 1

        def cf_extractor(x: torch.Tensor) -> torch.Tensor:
            return ext.net(x.to(device) / 127.5 - 1)[0]
    else:
        from cleanfid.inception_torchscript import InceptionV3W

        weights = tmp / INCEPTION_FILE
        if args.extractor == "inception-random":
            _log("writing a random Inception-v3 (real architecture) for an offline run")
            make_random_inception_file(weights)
        else:
            src = Path(args.weights or "")
            ext0 = InceptionExtractor(src, mode, device)  # one-line error if missing
            del ext0
            weights.symlink_to(src.resolve())
        ext = InceptionExtractor(weights, mode, device)
        # clean-fid's own wrapper, reading our local file (download=False: never its temp-path fetch).
        cf_model = InceptionV3W(str(tmp), download=False, resize_inside=(mode == "legacy_tensorflow")).to(device).eval()

        def cf_extractor(x: torch.Tensor) -> torch.Tensor:
            return cf_model(x.to(device))
        res, ch = 32, 3

    G = _generator(args, res, ch, device)
    res, ch = int(G.img_resolution), int(G.img_channels)
    z_dim = ch * res * res

    @torch.no_grad()
    def gen_u8(z: torch.Tensor) -> torch.Tensor:
        return quantize(one_step_generate(G, z.to(device).view(-1, ch, res, res)))

    # clean-fid draws z from the global RNG, which its reference DataLoader also consumes; the
    # wrapper draws the same latents as our path from a private generator instead.
    cf_rng = torch.Generator().manual_seed(args.seed)
    cf_time = {"first_gen": None, "last_feat": None}

    def gen_cleanfid(z: torch.Tensor) -> torch.Tensor:
        if cf_time["first_gen"] is None:
            cf_time["first_gen"] = time.time()
        x = gen_u8(torch.randn(tuple(z.shape), generator=cf_rng)).float()  # clean-fid wants [0, 255]
        return x.repeat(1, 3, 1, 1) if (not digits and x.shape[1] == 1) else x

    def timed(fn):
        def wrapped(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            cf_time["last_feat"] = time.time()
            return out
        return wrapped

    # Reference images: the digits (upscaled / RGB for Inception), as uint8 .npy for clean-fid.
    ds = open_dataset({"kind": "digits", "resolution": res, "channels": ch if digits else 3, "label_dim": 0,
                       "xflip": False, "path": None})
    ref_u8 = ds.uint8_images(list(range(args.refs)))
    refdir = tmp / "refs"
    refdir.mkdir()
    for i, im in enumerate(ref_u8):
        np.save(refdir / f"{i:06d}.npy", im)
    ref_t = torch.from_numpy(ref_u8).permute(0, 3, 1, 2)

    # --- our path: batched on the device, no per-image numpy ---
    with torch.no_grad():
        ref_ours = torch.cat([ext(ref_t[i:i + args.batch].to(device))[0] for i in range(0, args.refs, args.batch)])
        ext(gen_u8(torch.randn(2, z_dim)))  # warm-up
        torch.manual_seed(args.seed)
        t0 = time.time()
        feats = []
        for i in range(args.num // args.batch):
            feats.append(ext(gen_u8(torch.randn((args.batch, z_dim))))[0].cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_ours = time.time() - t0
    fid_ours = fd_from_features(torch.cat(feats), ref_ours)
    _log(f"ours: {args.num / t_ours:.1f} img/s, FD {fid_ours:.6f}")

    # --- clean-fid: compute_fid(gen=..., fdir2=refs); it reads the reference folder first, so its
    # generator path is timed from the first generator call to the last feature batch. ---
    warm = [2, ch, res, res] if digits else [2, 3, 299 if mode == "clean" else res, 299 if mode == "clean" else res]
    cf_extractor(torch.full(warm, 128.0, device=device))  # warm-up, as for ours
    fid_cf = float(cfid.compute_fid(gen=gen_cleanfid, fdir2=str(refdir), mode=mode, num_workers=0,
                                    batch_size=args.batch, device=device, num_gen=args.num, z_dim=z_dim,
                                    custom_feat_extractor=timed(cf_extractor), verbose=False,
                                    use_dataparallel=False))
    t_cf = max(cf_time["last_feat"] - cf_time["first_gen"], 1e-9)
    _log(f"clean-fid: {args.num / t_cf:.1f} img/s, FID {fid_cf:.6f}")
    out = {"extractor": args.extractor, "mode": mode, "device": str(device), "num": args.num, "refs": args.refs,
           "batch": args.batch, "ours_img_per_s": round(args.num / t_ours, 2),
           "cleanfid_img_per_s": round(args.num / t_cf, 2), "speedup": round(t_cf / t_ours, 2),
           "fd_ours": fid_ours, "fd_cleanfid": fid_cf, "abs_diff": abs(fid_ours - fid_cf),
           "agree_1e-3": abs(fid_ours - fid_cf) <= 1e-3}
    print(f"ours {out['ours_img_per_s']} img/s vs clean-fid {out['cleanfid_img_per_s']} img/s "
          f"(x{out['speedup']}); FD {fid_ours:.6f} vs {fid_cf:.6f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run()
