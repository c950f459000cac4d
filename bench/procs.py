"""Benchmarks over several processes: the launch, and timing that all processes share.

A training stage can run as N processes with T/N threads each (`resources.<rule>.procs`, gloo
on the CPU): on small networks one thread per process wastes far less on thread
synchronisation than T threads in one process do. `bench.step --procs N` and the `-pN` variants
of `bench.compare` time that layout. The benchmark re-runs itself under `sida.run.torchrun`
(`launch`); every process then executes the same sequence of timed calls in lockstep
(`timed_together`), and a call that only some processes make (a one-process contestant) runs
while the others wait in a barrier, which sleeps: the contestant has the whole machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


def launch(module: str, argv: Sequence[str], procs: int) -> int:
    """Run `python -m module argv` as `procs` processes (sida.run.torchrun, standalone) and
    return its exit status. The benchmarks print from rank 0 only."""
    # torchrun otherwise sets OMP_NUM_THREADS=1 with a warning; the benchmark sets its threads itself.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "sida.run.torchrun", "--standalone", f"--nproc-per-node={procs}",
           "-m", "--", module, *argv]
    return subprocess.call(cmd, env=env)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def gathered(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Every process's `values` as the rows of one [world, len(values)] float64 host tensor
    (on every process)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return torch.tensor([list(values)], dtype=torch.float64)
    # nccl reduces device tensors only; gloo host tensors
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.zeros(world, len(values), dtype=torch.float64, device=on)
    t[dist.get_rank()] = torch.tensor(list(values), dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return t.cpu()


def timed_together(fn: Optional[Callable[[], object]], device: torch.device, threads: int = 0) -> tuple[float, float]:
    """Time one call made by some of the job's processes (those passing `fn`; the rest pass None
    and wait). Returns, on every process, the slowest participant's wall seconds and the CPU
    seconds of all participants together. `threads` > 0 sets the participants' torch threads
    first. In a one-process job this is `timed`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # everyone starts together: no participant is still busy with the previous call
    wall = cpu = 0.0
    if fn is not None:
        if threads > 0:
            torch.set_num_threads(threads)
        wall, cpu = timed(fn, device)
    t = gathered([wall, cpu], device)
    return float(t[:, 0].max()), float(t[:, 1].sum())
