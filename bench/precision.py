"""Numerics of the low-precision paths on the CPU: EDM's fp16 path vs bf16 (autocast and the same
cast-the-UNet path in bf16), against fp32, on one SiD generator step and one fake-score step.

    python -m bench.precision [--res 16 --channels 3 --batch 16 --model-channels 32 --seed 0]

For each path it prints the error of the denoiser output over noise levels 0.002..80, and of the
parameter gradients of both losses (relative L2 error, and the share of gradient entries that are
non-zero in fp32 but exactly zero in low precision: underflow), with the per-process batch the
losses divide by set to the batch itself and to 2048 (the ImageNet preset: 8192 over 4 GPUs),
since that divisor is what pushes activation gradients towards fp16's underflow. No gradient
scaler is used (the official code has none). Last line: the numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from sida.nets.precond import EDMPrecond
from sida.nets.sampler import sid_sigma_t
from sida.train.losses import sid_critic_terms, sid_critic_objective, sid_generator_terms, sid_generator_objective

PATHS = {  # name -> (network compute dtype, autocast dtype or None)
    "fp16 (EDM path)": (torch.float16, None),
    "bf16 (autocast)": (torch.float32, torch.bfloat16),
    "bf16 (EDM path)": (torch.bfloat16, None),
}


def build(args: argparse.Namespace) -> EDMPrecond:
    torch.manual_seed(args.seed)
    net = EDMPrecond(img_resolution=args.res, img_channels=args.channels, label_dim=0, model_type="SongUNet",
                     model_channels=args.model_channels, channel_mult=[1, 2, 2], num_blocks=1,
                     attn_resolutions=[args.res // 2], dropout=0.0, augment_dim=0)
    with torch.no_grad():  # away from EDM's near-zero init of the output convs: ordinary numbers
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def run_path(nets: dict, compute: torch.dtype, amp: torch.dtype | None, data: dict, batch_total: int) -> dict:
    """Gradients of the SiD generator loss (G) and the fake-score loss (f) under one precision."""
    teacher, G, fake = (copy.deepcopy(nets[k]) for k in ("teacher", "G", "fake"))
    for n in (teacher, G, fake):
        n.compute_dtype = compute
    ctx = lambda: torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    teacher.requires_grad_(False)
    fake.requires_grad_(False)
    z, s_init, t, eps = data["z"], data["s_init"], data["t"], data["eps"]
    with ctx():
        x_g = G(s_init * z, s_init.flatten()).float()
        sigma_t = sid_sigma_t(t * 0.8)
        x_t = x_g + sigma_t * eps
        y_real, y_fake = teacher(x_t, sigma_t.flatten()), fake(x_t, sigma_t.flatten())
    l_sid, _, _ = sid_generator_terms(y_real.float(), y_fake.float(), x_g, 1.2)
    sid_generator_objective(l_sid, None, 100.0, 0.01, batch_total, False).backward()
    grad_g = torch.cat([p.grad.reshape(-1) for p in G.parameters() if p.grad is not None])

    fake.requires_grad_(True)
    with torch.no_grad(), ctx():
        x0 = G(s_init * z, s_init.flatten()).float()
    sigma = data["sigma"]
    with ctx():
        den = fake(x0 + data["noise"] * sigma, sigma.flatten())
    l_fake, _, _ = sid_critic_terms(den.float(), x0, sigma)
    sid_critic_objective(l_fake, None, batch_total).backward()
    grad_f = torch.cat([p.grad.reshape(-1) for p in fake.parameters() if p.grad is not None])
    return {"G": grad_g, "fake": grad_f}


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    nonfinite = int((~torch.isfinite(got)).sum())
    got = torch.nan_to_num(got)
    return {"rel_l2": float((got - ref).norm() / ref.norm()),
            "underflow": float(((ref != 0) & (got == 0)).float().mean()),
            "nonfinite": nonfinite}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    teacher = build(args).eval()
    G = copy.deepcopy(teacher)
    fake = copy.deepcopy(teacher)
    with torch.no_grad():  # a generator and fake score a little off the teacher: non-zero SiD loss
        for net in (G, fake):
            for q in net.parameters():
                q.add_(0.01 * torch.randn_like(q))
    nets = {"teacher": teacher, "G": G, "fake": fake}
    b, shape = args.batch, (args.batch, args.channels, args.res, args.res)
    g = torch.Generator().manual_seed(args.seed + 1)
    data = {"z": torch.randn(shape, generator=g), "s_init": torch.full([b, 1, 1, 1], 2.5),
            "t": torch.rand([b, 1, 1, 1], generator=g), "eps": torch.randn(shape, generator=g),
            "noise": torch.randn(shape, generator=g),
            "sigma": (torch.randn([b, 1, 1, 1], generator=g) * 1.2 - 1.2).exp()}

    results: dict = {"config": vars(args), "forward": {}, "grads": {}}
    sigmas = torch.tensor([0.002, 0.02, 0.2, 1.0, 5.0, 20.0, 80.0])
    x = torch.randn(len(sigmas), args.channels, args.res, args.res, generator=g) * 0.5
    noisy = x + torch.randn(x.shape, generator=g) * sigmas.view(-1, 1, 1, 1)
    with torch.no_grad():
        ref = teacher(noisy, sigmas)
    print(f"{'path':<18} {'max rel err of D(x; sigma), sigma 0.002..80':>44}")
    for name, (compute, amp) in PATHS.items():
        net = copy.deepcopy(teacher)
        net.compute_dtype = compute
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = net(noisy, sigmas)
        err = ((out - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1)).max().item()
        results["forward"][name] = err
        print(f"{name:<18} {err:>44.2e}")

    print(f"\n{'path':<18} {'divisor':>8} {'G rel L2':>10} {'G underflow':>12} {'f rel L2':>10} {'f underflow':>12} {'non-finite':>10}")
    for total in (b, 2048):
        ref_g = run_path(nets, torch.float32, None, data, total)
        for name, (compute, amp) in PATHS.items():
            got = run_path(nets, compute, amp, data, total)
            cg, cf = compare(ref_g["G"], got["G"]), compare(ref_g["fake"], got["fake"])
            results["grads"][f"{name} / {total}"] = {"G": cg, "fake": cf}
            print(f"{name:<18} {total:>8} {cg['rel_l2']:>10.2e} {cg['underflow']:>12.2%} {cf['rel_l2']:>10.2e} "
                  f"{cf['underflow']:>12.2%} {cg['nonfinite'] + cf['nonfinite']:>10}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
