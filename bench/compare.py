"""Side-by-side benchmark: our SiD/SiDA iteration against the authors' own loop, in one process.

    python -m bench.compare --authors-repo DIR --preset small32 --phase sida --ours fp32,fp32-cl,bf16 --threads 2
    python -m bench.compare --authors-repo DIR --preset digits --phase sid --ours fp32 --json out.json
    python -m bench.compare --authors-repo DIR --preset digits --phase sid --ours fp32,fp32-p2,fp32-cl-p2 --threads 2

DIR: a checkout of github.com/mingyuanzhou/SiD at bench.authors.AUTHORS_COMMIT ($SIDA_AUTHORS_REPO).
`--device auto` (the default) runs on the GPU when one is visible, else on the CPU; on CUDA the
device is drained around every timed iteration and the peak memory is the allocator's.

The yardstick ("authors") is their `sida_training_loop.training_loop` while-body as they wrote
it, one iteration per step, in this process (`bench.authors_iteration`: DDP a pass-through,
their own DataLoader over our in-memory images; their SiD path for `--phase sid`, their SiDA path with the
adversarial terms on for `--phase sida`), on the same teacher weights, batch, data and threads
(bench.official, our re-statement of it, is no yardstick: it ran slower than their code).
Ours is `sida.train.loop.DistillLoop.step` as a run would execute it. Every variant starts
from the same random teacher. Iterations are interleaved: each round runs one iteration of every
variant, in an order that rotates from round to round, so load drift on a shared machine hits
all of them alike; `--warmup` rounds are untimed. Reported per variant: median and best
iteration time and images/s, the ratio to the authors' loop (their time / ours: > 1 means
ours is faster; also in process CPU time, which a loaded machine distorts less when one thread
runs), the peak memory of one iteration (`PeakMemory`), then issue 33's verdict (`bench.goals`).

Variant names: `<precision>[-cl][-compile][-pN]` with precision fp32, bf16 (autocast) or fp16
(EDM's fp16 path, as `precision: fp16` runs it; CUDA only). `-cl` runs our networks channels-last
(`distill.channels_last`), `-compile` compiles them with torch.compile (`distill.compile`);
compile time (the first iterations) is reported apart, not in the rates. `-pN` runs our loop as
N processes (gloo on the CPU, one GPU each on CUDA) with threads / N threads each, splitting
the batch as a run with `resources.distill.procs: N` does (each process draws its batch slot's
noise: the computation of one process with N accumulation rounds). The benchmark then re-runs
itself under `sida.run.torchrun` with N processes; the authors' loop and the one-process
variants run in rank 0 with all `--threads` while the other ranks wait asleep, and a `-pN`
iteration's time is its slowest process's (`bench.procs`). Peak memory is per process (one
GPU's share).

Presets (overridable with the network flags): `small32` is the issue's SongUNet (32x32x3, 32
channels, mult 1,2,2, 2 blocks, attention at 16, batch 32); `digits` the embedded default's
(8x8x1, 32 channels, mult 1,2, 1 block, no attention, 10 labels, batch 64).
Human-readable lines first; the last line is one JSON object (also written to --json).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import sida  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch
import torch.distributed as dist

from bench.authors import FETCH_HINT, check_checkout, fail
from bench.authors_iteration import AuthorsIteration
from bench.goals import print_verdict
from bench.step import MemoryDataset, build_teacher, network_line, run_config
from bench.procs import gathered, launch, timed_together
from sida.run.dist import init as dist_init, launched
from sida.train.loop import DistillLoop
from sida.train.nets import init_nets

PRESETS = {
    "small32": dict(res=32, channels=3, model_channels=32, channel_mult="1,2,2", num_blocks=2, attn_res="16",
                    label_dim=0, batch=32),
    "digits": dict(res=8, channels=1, model_channels=32, channel_mult="1,2", num_blocks=1, attn_res="0",
                   label_dim=10, batch=64),
}
PRECISIONS = ("fp32", "bf16", "fp16")


def parse_variant(name: str) -> dict:
    """'bf16-cl-compile-p2' -> {precision: bf16, channels_last: True, compile: True, procs: 2}."""
    parts = name.split("-")
    procs = [int(p[1:]) for p in parts[1:] if re.fullmatch(r"p[1-9][0-9]*", p)]
    if (parts[0] not in PRECISIONS or len(procs) > 1
            or any(p not in ("cl", "compile") and not re.fullmatch(r"p[1-9][0-9]*", p) for p in parts[1:])):
        raise SystemExit(f"error: unknown variant {name!r}: use <fp32|bf16|fp16>[-cl][-compile][-pN]")
    return {"precision": parts[0], "channels_last": "cl" in parts[1:], "compile": "compile" in parts[1:],
            "procs": procs[0] if procs else 1}


# ---------------------------------------------------------------------------------------------
# Memory of one iteration.


class PeakMemory:
    """Peak memory of one call, above what was live before it.

    CUDA: the allocator's peak. CPU: the process's resident high-water mark (reset through
    /proc/self/clear_refs) after glibc is told to serve every allocation of 64 KiB or more by
    its own mmap and to hand freed heap pages back (malloc_trim), so the resident size follows
    the live tensors. Set up only for the memory pass, after the timing: the mmap per
    allocation would slow the timed iterations.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
                open("/proc/self/clear_refs", "w").close()
            except OSError:
                self.libc = None

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self.libc is not None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024

    def __call__(self, fn: Callable[[], object]) -> int:
        """Bytes allocated at the peak of `fn()` beyond those live when it started."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident high-water mark to the current resident size
        base = self._status("VmRSS")
        fn()
        return self._status("VmHWM") - base


def state_bytes(*objs) -> int:
    """Bytes of the distinct tensors held by modules (parameters, buffers, gradients) and
    optimisers (their state): what an iteration starts from."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for p in o.parameters():
                add(p)
                add(p.grad)
            for b in o.buffers():
                add(b)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
    return total


# ---------------------------------------------------------------------------------------------
# The contestants.


class Contestant:
    """One timed iteration function plus what it holds, run by `procs` processes of `threads`
    threads each (`step` and `holds` are None in the processes that do not take part)."""

    def __init__(self, name: str, step: Callable[[], object] | None, holds: Callable[[], list] | None, batch: int,
                 procs: int = 1, threads: int = 0) -> None:
        self.name, self.step, self.holds, self.batch = name, step, holds, batch
        self.procs, self.threads = procs, threads
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds: steadier than wall time on a loaded machine
        self.first_s: list[float] = []  # untimed first iterations (compile, allocator warm-up)


def _args_ns(a: argparse.Namespace, channels_last: bool) -> argparse.Namespace:
    ns = copy.copy(a)
    ns.channels_last = channels_last
    return ns


def build(args: argparse.Namespace, info) -> list[Contestant]:
    """The authors' iteration (rank 0, all `args.threads` threads) and our variants: a `-pN`
    variant runs in all N processes of the job with threads / N threads each, the others in
    rank 0 alone (a one-process group of their own)."""
    world = info.world_size
    # The one-process contestants' own group (new_group is called by every rank).
    solo = replace(info, rank=0, world_size=1, group=dist.new_group([0])) if world > 1 else info
    teacher = build_teacher(args).to(info.device)
    data = MemoryDataset(max(4 * args.batch, 256), args.channels, args.res, args.label_dim)
    dataset = data if args.phase == "sida" else None  # our SiD draws labels; their loop always reads data
    out = []
    step = holds = None
    if info.rank == 0:
        theirs = AuthorsIteration(Path(args.authors_repo), run_config(_args_ns(args, False)), teacher, data,
                                  discriminator=args.phase == "sida", seed=1, device=info.device)
        step, holds = theirs.step, theirs.holds
    out.append(Contestant("authors", step, holds, args.batch, 1, args.threads))
    for name in args.ours:
        v = parse_variant(name)
        if v["precision"] == "fp16" and info.device.type != "cuda":
            raise SystemExit("error: fp16 (EDM's fp16 path) is a CUDA option: drop fp16 variants on the CPU")
        if v["procs"] not in (1, world):
            raise SystemExit(f"error: variant {name!r} asks for {v['procs']} processes in a job of {world}: "
                             f"start bench.compare without a launcher, it starts its own")
        step = holds = None
        if v["procs"] == world or info.rank == 0:
            rc = run_config(_args_ns(args, v["channels_last"]))
            rc.update(precision=v["precision"], compile=v["compile"])
            # Each process draws from its own batch slot's generators, as a run with N processes does.
            loop = DistillLoop(rc, init_nets(copy.deepcopy(teacher), None), dataset, info if v["procs"] > 1 else solo)

            def step(loop=loop):
                stats = loop.step()
                loop.nimg += loop.batch
                return stats

            holds = lambda lp=loop: [lp.nets.teacher, lp.nets.G, lp.nets.G_ema, lp.nets.fake, lp.opt_critic, lp.opt_g]
        out.append(Contestant(f"ours-{name}", step, holds, args.batch, v["procs"], max(args.threads // v["procs"], 1)))
    return out


def measure(args: argparse.Namespace, info, out=sys.stdout) -> dict:
    dev = info.device
    load0 = os.getloadavg()
    cs = build(args, info)

    def run(c: Contestant) -> tuple[float, float]:
        return timed_together(c.step, dev, c.threads)

    for c in cs:  # first iterations: compile, oneDNN primitive creation, allocator growth
        for _ in range(args.first):
            c.first_s.append(run(c)[0])
    for _ in range(args.warmup):
        for c in cs:
            run(c)
    for i in range(args.iters):
        k = i % len(cs)
        for c in cs[k:] + cs[:k]:  # rotate the order from round to round
            wall, cpu = run(c)
            c.times.append(wall)
            c.cpu_times.append(cpu)
    mem = PeakMemory(dev)
    peaks, peaks_all = {}, {}
    if mem.available and not args.no_memory:
        for c in cs:
            run(c)  # one iteration under the memory pass's allocation policy first
            peak = 0
            if c.step is not None:
                if c.threads > 0:
                    torch.set_num_threads(c.threads)
                peak = state_bytes(*c.holds()) + mem(c.step)
            per_proc = gathered([peak], dev)[:, 0]
            peaks[c.name], peaks_all[c.name] = float(per_proc.max()), float(per_proc.sum())
    load1 = os.getloadavg()
    prof = None
    if args.profile and info.rank == 0:  # after the timing and the memory pass: it slows what it watches
        from bench.opprofile import print_side_by_side, profile_interleaved

        ones = {c.name: (c.step, c.threads) for c in cs if c.procs == 1}  # -pN needs all its processes
        prof = print_side_by_side(profile_interleaved(ones, args.profile), "authors", out)

    off = cs[0]
    off_med, off_best = statistics.median(off.times), min(off.times)
    off_cpu = statistics.median(off.cpu_times)
    rows = {}
    for c in cs:
        med, best, cpu = statistics.median(c.times), min(c.times), statistics.median(c.cpu_times)
        row = {"iter_ms_median": med * 1e3, "iter_ms_best": best * 1e3, "images_per_sec": c.batch / med,
               "images_per_sec_best": c.batch / best, "first_iters_s": [round(t, 3) for t in c.first_s],
               "speedup_vs_authors": off_med / med, "speedup_vs_authors_best": off_best / best,
               "cpu_ms_median": cpu * 1e3, "cpu_speedup_vs_authors": off_cpu / cpu}
        row.update(procs=c.procs, threads_per_proc=c.threads)
        if c.name in peaks:  # per process (what one GPU must hold), and over all of them
            row["peak_memory_mb"] = peaks[c.name] / 2 ** 20
            row["peak_memory_vs_authors"] = peaks[c.name] / peaks["authors"]
            row["peak_memory_all_procs_mb"] = peaks_all[c.name] / 2 ** 20
        rows[c.name] = row
        mem_s = (f", peak memory {row['peak_memory_mb']:8.1f} MB ({row['peak_memory_vs_authors']:.2f}x authors)"
                 if "peak_memory_mb" in row else "")
        print(f"{c.name:>20}: {row['images_per_sec']:8.2f} img/s median ({row['images_per_sec_best']:8.2f} best), "
              f"{row['speedup_vs_authors']:.2f}x authors (best/best {row['speedup_vs_authors_best']:.2f}x, "
              f"CPU time {row['cpu_speedup_vs_authors']:.2f}x){mem_s}", file=out)
        if c.first_s:
            print(f"{'':>20}  first {len(c.first_s)} iteration(s), untimed: "
                  f"{', '.join(f'{t:.2f}' for t in c.first_s)} s", file=out)
    print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end, on {os.cpu_count()} CPUs "
          f"({cpu_name()})", file=out)
    goals = print_verdict(rows, out)
    return {
        "preset": args.preset, "phase": args.phase, "res": args.res, "channels": args.channels, "batch": args.batch,
        "model_channels": args.model_channels, "channel_mult": args.channel_mult, "num_blocks": args.num_blocks,
        "attn_res": args.attn_res, "label_dim": args.label_dim, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "cpus": os.cpu_count(), "threads": args.threads, "interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup, "first": args.first,
        "load_avg_start": load0[0], "load_avg_end": load1[0], "variants": rows, "goals": goals, "profile_ms": prof,
    }


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for naming the machine next to the figures."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small32")
    p.add_argument("--phase", choices=["sid", "sida"], default="sida")
    p.add_argument("--ours", default="fp32", help="comma list of our variants (see the module docstring)")
    for k in ("res", "channels", "model_channels", "num_blocks", "label_dim", "batch"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--channel-mult", default=None)
    p.add_argument("--attn-res", default=None)
    p.add_argument("--iters", type=int, default=6, help="timed rounds (one iteration of every variant each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first iterations")
    p.add_argument("--first", type=int, default=1, help="untimed first iterations per variant (compile time)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the GPU when one is visible, else the CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N iterations of each one-process contestant (torch.profiler) and print "
                        "their self CPU time per iteration side by side, by section and by operator")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--authors-repo", type=Path, default=os.environ.get("SIDA_AUTHORS_REPO"),
                   help="checkout of github.com/mingyuanzhou/SiD at bench.authors.AUTHORS_COMMIT "
                        "(default $SIDA_AUTHORS_REPO)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ours = [v for v in args.ours.split(",") if v]
    counts = {parse_variant(v)["procs"] for v in args.ours} - {1}
    if len(counts) > 1:
        raise SystemExit(f"error: variants ask for {sorted(counts)} processes: one run takes one process count "
                         f"besides 1")
    return args


def require_authors(args: argparse.Namespace) -> None:
    """One line, naming how to fetch it, unless --authors-repo is a checkout at AUTHORS_COMMIT."""
    if args.authors_repo is None:
        fail(f"bench.compare measures against the authors' code: pass --authors-repo DIR (or set "
             f"SIDA_AUTHORS_REPO), DIR a checkout of it: {FETCH_HINT}")
    check_checkout(Path(args.authors_repo))


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    procs = max([parse_variant(v)["procs"] for v in args.ours] + [1])
    if procs > 1 and not launched():
        # The machine's thread budget, fixed here: the authors' loop and one-process variants
        # get all of it, a -pN variant's processes a share each.
        threads = args.threads or torch.get_num_threads()
        require_authors(args)  # once, before the processes start
        sys.exit(launch("bench.compare", [*argv, "--threads", str(threads)], procs))
    info = dist_init(args.device, args.threads)
    require_authors(args)
    args.threads = args.threads or torch.get_num_threads()
    out = sys.stdout if info.is_main else open(os.devnull, "w")
    if info.device.type == "cuda":  # the authors' settings: cuDNN autotuning, no TF32
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"[bench.compare] {args.preset} {args.phase}: {network_line(args)}; {info.device}, threads {args.threads}"
          f"{f' ({procs} processes for -p{procs})' if procs > 1 else ''}; ours: {', '.join(args.ours)}",
          file=out, flush=True)
    result = measure(args, info, out)
    line = json.dumps(result)
    if args.json and info.is_main:
        from sida.io.atomic import atomic_write_text

        atomic_write_text(args.json, line + "\n")
    print(line, file=out, flush=True)
    return result


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)  # errors (e.g. --device cuda without a GPU) as one `error:` line
