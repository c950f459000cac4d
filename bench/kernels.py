"""Which memory layout's kernels win on this CPU: a 3x3 convolution and a group norm, forward plus
backward, NCHW against channels-last, at the shapes of the benchmark networks' UNets.

    python -m bench.kernels [--threads 1] [--repeats 15]

Times are the calling thread's CPU seconds (`time.thread_time`, median of `--repeats`), which a
machine shared with other jobs distorts less than wall time; with `--threads` > 1 they are the
process's (`time.process_time`). Whole iterations (`bench.compare`, `-cl` variants) decide a
setting; this says which kernels make the difference. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Sequence

import sida  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch
import torch.nn.functional as F

from bench.compare import cpu_name

# (batch, channels in, resolution, channels out): the small32 SongUNet's 32/16/8 levels and the
# digits network's 8/4 levels, at their benchmark batches (the fake score's batched pass doubles them).
SHAPES = [(32, 32, 32, 32), (32, 64, 16, 64), (64, 64, 16, 64), (32, 64, 8, 64), (64, 32, 8, 32), (64, 64, 4, 64)]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def median_cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    fn()  # oneDNN primitive creation, allocator growth
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def kernel_times(shape: tuple[int, int, int, int], repeats: int) -> dict[str, float]:
    """{'conv_nchw': ms, 'conv_cl': ms, 'group_norm_nchw': ms, 'group_norm_cl': ms}: forward + backward."""
    n, c, res, co = shape
    out = {}
    for name, fmt in LAYOUTS.items():
        x = torch.randn(n, c, res, res).contiguous(memory_format=fmt).requires_grad_()
        w = torch.randn(co, c, 3, 3, requires_grad=True)
        b = torch.randn(co, requires_grad=True)
        g_conv = torch.randn(n, co, res, res).contiguous(memory_format=fmt)
        gamma, beta = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        g_norm = torch.randn(n, c, res, res).contiguous(memory_format=fmt)
        out[f"conv_{name}"] = median_cpu_ms(lambda: F.conv2d(x, w, b, padding=1).backward(g_conv), repeats)
        out[f"group_norm_{name}"] = median_cpu_ms(
            lambda: F.group_norm(x, min(32, c // 4), gamma, beta).backward(g_norm), repeats)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"[bench.kernels] {cpu_name()}, torch {torch.__version__}, ATen CPU capability {cap}, "
          f"threads {args.threads}; CPU ms, forward + backward (channels-last / NCHW)")
    rows = []
    for shape in SHAPES:
        t = kernel_times(shape, args.repeats)
        rows.append({"shape": list(shape), **t})
        print(f"  {str(list(shape)):<18} conv 3x3 {t['conv_nchw']:8.2f} NCHW {t['conv_cl']:8.2f} CL "
              f"({t['conv_cl'] / t['conv_nchw']:.2f}x)   group norm {t['group_norm_nchw']:7.2f} NCHW "
              f"{t['group_norm_cl']:7.2f} CL ({t['group_norm_cl'] / t['group_norm_nchw']:.2f}x)")
    result = {"cpu": cpu_name(), "capability": cap, "torch": torch.__version__, "threads": args.threads,
              "rows": rows}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
