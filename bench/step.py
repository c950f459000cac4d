"""Benchmark: one SiD / SiDA distillation iteration (`sida.train.loop.DistillLoop.step`) on the CPU.

    python -m bench.step --phase {sid,sida} --res 32 --channels 3 --batch 32 --model-channels 32 \
        --channel-mult 1,2,2 --attn-res 16 [--num-blocks 2] --iters 10 --warmup 2 --threads 2 \
        [--channels-last] [--compare-separate] [--compare-unfused] [--profile N] [--procs N] [--flops]

Builds a teacher-sized trio (teacher, generator, fake score: random EDMPrecond SongUNets with
DDPM++ settings, dropout 0, label_dim 0), an in-memory dataset for SiDA's real images, and times
`--iters` full iterations of our loop after `--warmup` untimed ones. In the same process and
interleaved with them, it times the *floor*: the same network forward/backward calls the
iteration makes (same shapes, same frozen/trainable parameters, same memory format) with none
of the loop's logic (no losses, optimiser, EMA, data, RNG bookkeeping). floor_ratio =
median iteration time / median floor time.

--compare-separate also times iterations whose discriminator runs the real and fake encoder
passes as two network calls (as the official SiDA code does) instead of one batched call, and
reports separate / batched time. --compare-unfused also times the same iteration, from the same start,
with torch's default (not fused) Adam / AdamW step (`DistillLoop(fused_optimizer=False)`) and
reports unfused / fused time (the loop's optimiser step is the fused one). --procs N runs the loop as N processes (gloo) with threads / N
threads each and the batch split between them, the layout of a stage with
`resources.distill.procs: N` (see bench.procs); times are the slowest process's.
Human-readable lines go to stdout first; the last line is one JSON object (images_per_sec =
median, images_per_sec_best = best-of, floor_ratio, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from contextlib import contextmanager
from typing import Callable, Sequence

import sida  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

from bench.procs import launch, timed_together
from sida.train.methods import sid as sid_method
from sida.run.dist import init as dist_init, launched
from sida.train.loop import DistillLoop
from sida.train.nets import init_nets
from sida.train.draws import make_generators
from sida.nets.precond import EDMPrecond


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip() and int(v) > 0]


class MemoryDataset:
    """Random images in [-1, 1] held as one tensor: `get_batch` is a single index, no decoding.
    The data-source interface the distillation loop reads (`get_batch`, `labels`)."""

    def __init__(self, n: int, channels: int, res: int, label_dim: int = 0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand([n, channels, res, res], generator=g) * 2 - 1
        self.onehot = torch.zeros([n, label_dim])
        if label_dim:
            self.onehot[torch.arange(n), torch.randint(label_dim, (n,), generator=g)] = 1

    def __len__(self) -> int:
        return self.images.shape[0]

    def labels(self, indices) -> torch.Tensor:
        return self.onehot[torch.as_tensor(indices).reshape(-1)]

    def get_batch(self, indices, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices).reshape(-1)
        return self.images[idx], self.onehot[idx]


def network_line(args: argparse.Namespace) -> str:
    """The benchmark network's settings, for a benchmark's first line."""
    return (f"{args.res}x{args.res}x{args.channels}, batch {args.batch}, model_channels {args.model_channels}, "
            f"mult {args.channel_mult}, blocks {args.num_blocks}, attn {args.attn_res}, labels {args.label_dim}")


def build_teacher(args: argparse.Namespace) -> torch.nn.Module:
    """A random EDMPrecond SongUNet with EDM's DDPM++ settings at the requested size."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=args.res, img_channels=args.channels, label_dim=args.label_dim,
                     model_type="SongUNet",
                     model_channels=args.model_channels, channel_mult=_ints(args.channel_mult),
                     channel_mult_emb=4, num_blocks=args.num_blocks, attn_resolutions=_ints(args.attn_res),
                     dropout=0.0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                     decoder_type="standard", resample_filter=[1, 1])
    # Random weights with EDM's init leave conv1/proj/aux_conv at 1e-5: perturb them so the
    # numbers are ordinary (speed does not depend on it, but NaN/denormal paths would).
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval().requires_grad_(False)


def run_config(args: argparse.Namespace) -> dict:
    """The distill settings of a one-phase run of `args.phase` (config defaults otherwise)."""
    return dict(sigma_init=2.5, tmax=800, alpha=1.2, lambda_sid=100.0, lambda_adv=0.01, lambda_d=1.0,
                P_mean=-1.2, P_std=1.2, batch=args.batch, batch_per_proc=None, lr_g=1e-5, lr_fake=1e-5,
                adam_eps=1e-8, ema_halflife_kimg=1.0, ema_rampup_ratio=None, dropout=None, fake_clip=1.0,
                precision="fp32", channels_last=args.channels_last, discriminator=args.phase == "sida",
                phases=[{"kind": args.phase, "kimg": 1e9}], init="teacher", init_generator=None)


def separate_fake_forward(fake, x_fake, x_real, sigma, labels, sida_disc, augment_labels=None):
    """The official SiDA layout: fakes through encoder+decoder, reals through the encoder, as two
    calls (the signature of `sida.train.methods.sid.fake_forward`, which it stands in for)."""
    aug_fake, aug_real = augment_labels if augment_labels is not None else (None, None)
    if not sida_disc:
        return fake(x_fake, sigma, labels, augment_labels=aug_fake), None, None
    denoised, logits_fake = fake(x_fake, sigma, labels, augment_labels=aug_fake, return_flag="encoder_decoder")
    logits_real = fake(x_real, sigma, labels, augment_labels=aug_real, return_flag="encoder")
    return denoised, logits_fake, logits_real


@contextmanager
def fake_forward_as(fn: Callable):
    """Swap SiD's fake-score forward (a module attribute, looked up at call time)."""
    saved = sid_method.fake_forward
    sid_method.fake_forward = fn
    try:
        yield
    finally:
        sid_method.fake_forward = saved


class Floor:
    """The network calls of one iteration, bare: what no loop can avoid doing."""

    def __init__(self, loop: DistillLoop, phase: str, separate: bool) -> None:
        self.loop, self.phase, self.separate = loop, phase, separate
        n = loop.micro
        c, h, w = loop.img_shape
        fmt = torch.channels_last if loop.rc.get("channels_last") else torch.contiguous_format
        mk = lambda *s: torch.randn(*s).contiguous(memory_format=fmt) if len(s) == 4 else torch.randn(*s)
        self.z, self.noise, self.real = mk(n, c, h, w), mk(n, c, h, w), mk(n, c, h, w)
        self.sigma = torch.rand(n) * 2 + 0.1
        self.labels = torch.eye(max(loop.label_dim, 1))[torch.arange(n) % max(loop.label_dim, 1)][:, :loop.label_dim]
        self.s_init = torch.full([n], 2.5)

    def __call__(self) -> None:
        nets, adversarial = self.loop.nets, self.phase == "sida"
        disc = self.loop.disc == "sida"
        # 1. fake-score update: G forward without grad, f_psi forward/backward (parameter grads).
        nets.fake.requires_grad_(True)
        with torch.no_grad():
            x_g = nets.G(self.z * 2.5, self.s_init, self.labels)
        x = x_g + self.noise
        if disc and self.separate:
            d, lf = nets.fake(x, self.sigma, self.labels, return_flag="encoder_decoder")
            lr = nets.fake(self.real, self.sigma, self.labels, return_flag="encoder")
            loss = d.square().sum() + lf.sum() + lr.sum()
        elif disc:
            b = x.shape[0]
            d, lg = nets.fake(torch.cat([x, self.real]), torch.cat([self.sigma, self.sigma]),
                              torch.cat([self.labels, self.labels]), return_flag="encoder_decoder", decode_first=b)
            loss = d.square().sum() + lg.sum()
        else:
            loss = nets.fake(x, self.sigma, self.labels).square().sum()
        loss.backward()
        nets.fake.requires_grad_(False)
        # 2. generator update: G forward/backward through the frozen teacher and fake score.
        nets.G.requires_grad_(True)
        x_g = nets.G(self.z * 2.5, self.s_init, self.labels)
        x_t = x_g + self.noise
        y_r = nets.teacher(x_t, self.sigma, self.labels)
        if adversarial:
            y_f, lg = nets.fake(x_t, self.sigma, self.labels, return_flag="encoder_decoder")
            loss = (y_r * y_f).sum() + lg.sum()
        else:
            loss = (y_r * nets.fake(x_t, self.sigma, self.labels)).sum()
        loss.backward()
        nets.G.requires_grad_(False)
        for p in list(nets.G.parameters()) + list(nets.fake.parameters()):
            p.grad = None


def build_loop(args: argparse.Namespace, info, fused_optimizer: bool = True) -> DistillLoop:
    teacher = build_teacher(args)
    nets = init_nets(teacher, None)
    dataset = MemoryDataset(max(4 * args.batch, 256), args.channels, args.res, args.label_dim) if args.phase == "sida" else None
    gens = make_generators(0, info.rank, info.device)  # each process its own batch slot, as in a run
    return DistillLoop(run_config(args), nets, dataset, info, gens, fused_optimizer=fused_optimizer)


def _timed(fn: Callable[[], object]) -> float:
    """Wall seconds of `fn()` in every process of the job (the slowest one's)."""
    return timed_together(fn, torch.device("cpu"))[0]


def flop_counts(loop: DistillLoop) -> dict:
    """GFLOP of one iteration in this process (torch's FLOP counter: convolutions and matrix
    products; SDPA attention has no formula there) and of its convolutions, and the GFLOP/s of a
    2048x2048 float32 matrix product run by every process at once: the arithmetic rate one
    process reaches in this thread layout."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loop.step()
    loop.nimg += loop.batch
    counts = counter.get_flop_counts()["Global"]
    a = torch.randn(2048, 2048)
    a @ a  # warm-up
    reps = 5
    wall = _timed(lambda: [a @ a for _ in range(reps)])
    return {"gflop": sum(counts.values()) / 1e9,
            "conv_gflop": sum(v for op, v in counts.items() if "convolution" in str(op)) / 1e9,
            "sgemm_gflops": reps * 2 * 2048 ** 3 / wall / 1e9}


def measure(args: argparse.Namespace, info, out=sys.stdout) -> dict:
    loop = build_loop(args, info)
    modes = ["batched"] + (["separate"] if args.compare_separate and args.phase == "sida" else [])
    # `unfused`: the same iteration from the same start with torch's default Adam step (its own loop).
    loops = {m: loop for m in modes}
    if args.compare_unfused:
        modes.append("unfused")
        loops["unfused"] = build_loop(args, info, fused_optimizer=False)
    step_fn = {"batched": sid_method.fake_forward, "separate": separate_fake_forward,
               "unfused": sid_method.fake_forward}
    floors = {m: Floor(loops[m], args.phase, m == "separate") for m in modes}
    times = {m: [] for m in modes}
    floor_times = {m: [] for m in modes}

    def one(mode: str, record: bool) -> None:
        with fake_forward_as(step_fn[mode]):
            t = _timed(loops[mode].step)
        loops[mode].nimg += loop.batch
        f = _timed(floors[mode])
        if record:
            times[mode].append(t)
            floor_times[mode].append(f)

    t_first = _timed(loop.step)  # first iteration (allocator / oneDNN primitive warm-up), untimed below
    loop.nimg += loop.batch
    if "unfused" in loops:
        loops["unfused"].step()
        loops["unfused"].nimg += loop.batch
    for _ in range(args.warmup):
        for m in modes:
            one(m, False)
    for i in range(args.iters):
        for m in (modes if i % 2 == 0 else modes[::-1]):  # alternate the order: drift hits both
            one(m, True)

    flops = flop_counts(loop) if args.flops else None
    conv_s = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile):
                loop.step()
        events = prof.key_averages()
        conv_us = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
        conv_s = conv_us / 1e6 / args.profile  # per iteration
        if info.is_main:
            share = conv_us / max(sum(e.self_cpu_time_total for e in events), 1)
            print(events.table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
            print(f"convolutions: {100 * share:.1f}% of the self CPU time", file=sys.stderr)

    B = args.batch
    res = {}
    for m in modes:
        med, best = statistics.median(times[m]), min(times[m])
        fmed, fbest = statistics.median(floor_times[m]), min(floor_times[m])
        res[m] = dict(median_s=med, best_s=best, floor_median_s=fmed, floor_best_s=fbest,
                      ips=B / med, ips_best=B / best, floor_ratio=med / fmed, floor_ratio_best=best / fbest)
        print(f"{m:>9}: {B / med:7.2f} img/s median, {B / best:7.2f} best  |  iteration {med * 1e3:8.1f} ms "
              f"(best {best * 1e3:.1f}), floor {fmed * 1e3:8.1f} ms (best {fbest * 1e3:.1f}), "
              f"ratio {med / fmed:.3f} (best/best {best / fbest:.3f})", file=out)
    b = res["batched"]
    result = {
        "phase": args.phase, "res": args.res, "channels": args.channels, "batch": B,
        "model_channels": args.model_channels, "channel_mult": _ints(args.channel_mult),
        "attn_res": _ints(args.attn_res), "num_blocks": args.num_blocks, "label_dim": args.label_dim,
        "threads": args.threads, "procs": info.world_size, "threads_per_proc": torch.get_num_threads(),
        "channels_last": bool(args.channels_last), "iters": args.iters, "warmup": args.warmup,
        "images_per_sec": b["ips"], "images_per_sec_best": b["ips_best"],
        "iter_ms_median": b["median_s"] * 1e3, "iter_ms_best": b["best_s"] * 1e3,
        "floor_ms_median": b["floor_median_s"] * 1e3, "floor_ms_best": b["floor_best_s"] * 1e3,
        "floor_ratio": b["floor_ratio"], "floor_ratio_best": b["floor_ratio_best"],
        "first_iter_ms": t_first * 1e3,
    }
    if flops is not None:  # what one process computes per iteration, against what its cores can
        result.update(gflop_per_iter=flops["gflop"], conv_gflop_per_iter=flops["conv_gflop"],
                      gflops_achieved=flops["gflop"] / b["median_s"], sgemm_gflops=flops["sgemm_gflops"])
        line = (f"per process: {flops['gflop']:.1f} GFLOP per iteration ({flops['conv_gflop']:.1f} in convolutions), "
                f"{result['gflops_achieved']:.1f} GFLOP/s achieved")
        if conv_s:  # the convolutions' own rate, from the profiled iterations
            result["conv_gflops"] = flops["conv_gflop"] / conv_s
            line += f", the convolutions at {result['conv_gflops']:.1f} GFLOP/s"
        print(f"{line}; a 2048^2 float32 matrix product runs at {flops['sgemm_gflops']:.1f} GFLOP/s", file=out)
    if "separate" in res:
        s = res["separate"]
        result.update(separate_images_per_sec=s["ips"], separate_images_per_sec_best=s["ips_best"],
                      separate_floor_ratio=s["floor_ratio"],
                      batched_speedup_vs_separate=s["median_s"] / b["median_s"],
                      batched_speedup_vs_separate_best=s["best_s"] / b["best_s"])
        print(f"batched encoder passes vs separate: {result['batched_speedup_vs_separate']:.3f}x (median), "
              f"{result['batched_speedup_vs_separate_best']:.3f}x (best)", file=out)
    if "unfused" in res:
        u = res["unfused"]
        result.update(unfused_images_per_sec=u["ips"], unfused_images_per_sec_best=u["ips_best"],
                      fused_speedup=u["median_s"] / b["median_s"], fused_speedup_best=u["best_s"] / b["best_s"])
        print(f"fused Adam (the loop's) vs torch's default step: {result['fused_speedup']:.3f}x (median), "
              f"{result['fused_speedup_best']:.3f}x (best)", file=out)
    print(f"first iteration {t_first * 1e3:.1f} ms", file=out)
    return result


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["sid", "sida"], default="sida")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--attn-res", default="16", help="comma list of resolutions with attention; 0 = none")
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--label-dim", type=int, default=0, help="class labels (0: unconditional; digits: 10)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads in all (0: torch's default)")
    p.add_argument("--procs", type=int, default=1,
                   help="run the loop as N processes (gloo) with threads / N threads each, the batch split "
                        "between them, as resources.distill.procs does; the time is the slowest process's")
    cl = p.add_mutually_exclusive_group()
    cl.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                    help="run the networks channels-last (distill.channels_last)")
    cl.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compare-separate", action="store_true",
                   help="also time separate real/fake discriminator encoder passes (official layout)")
    p.add_argument("--compare-unfused", action="store_true",
                   help="also time the iteration with torch's default, not fused, Adam step "
                        "(DistillLoop(fused_optimizer=False))")
    p.add_argument("--profile", type=int, default=0,
                   help="profile N extra iterations (table and the convolutions' share of the time to stderr)")
    p.add_argument("--flops", action="store_true",
                   help="count one iteration's FLOPs and report the achieved GFLOP/s (with --profile, the "
                        "convolutions' own) next to a float32 matrix product's in the same thread layout")
    args = p.parse_args(argv)
    if args.channels_last is None:
        args.channels_last = False
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.procs < 1:
        raise SystemExit("error: --procs must be at least 1")
    if args.procs > 1 and not launched():
        threads = args.threads or torch.get_num_threads()  # the budget, split between the processes
        sys.exit(launch("bench.step", [*argv, "--threads", str(threads)], args.procs))
    args.threads = args.threads or torch.get_num_threads()
    info = dist_init("cpu", max(args.threads // max(args.procs, 1), 1))
    out = sys.stdout if info.is_main else open(os.devnull, "w")
    print(f"[bench.step] phase {args.phase}, {network_line(args)}, threads {args.threads} "
          f"({info.world_size} process(es) x {torch.get_num_threads()}), channels_last {args.channels_last}",
          file=out, flush=True)
    result = measure(args, info, out)
    print(json.dumps(result), file=out, flush=True)
    return result


if __name__ == "__main__":
    main()
