"""Per-section CPU profile of training iterations, for putting two loops side by side.

`profile_interleaved` runs iterations of several loops under torch.profiler, taking turns, and
returns each one's self CPU time per iteration of each operator; `sections` sums those into the parts an iteration is
made of (convolutions, group norms, our custom autograd functions, copies, the optimiser step,
random draws, ...). bench.compare --profile N prints both sides' sections and top operators in one
run, interleaved with nothing else, so the differences point at where one loop loses time.
"""

from __future__ import annotations

import re
from typing import Callable, TextIO

import torch

# Section -> operator-name pattern (first match wins; self time, so nested ops are not counted twice).
SECTIONS: list[tuple[str, str]] = [
    ("custom autograd functions (their own Python)", r"^_[A-Z]\w*$"),
    ("attention (SDPA; einsum products and softmax)", r"attention|softmax|bmm|baddbmm|einsum"),
    ("convolution and linear", r"conv|mkldnn_convolution|_convolution|convolution_backward|addmm|mm$|linear|matmul"),
    ("group norm", r"group_norm|native_group_norm"),
    ("copies", r"copy_|clone|contiguous|to_copy|_to_copy|cat|stack|index|gather|scatter|expand|as_strided_scatter"),
    ("optimizer (fused Adam)", r"adam|_fused|foreach"),
    ("random draws", r"randn|normal_|uniform_|rand$|randint|bernoulli|multinomial|exponential"),
    ("elementwise", r"add|mul|sub|div|silu|sigmoid|exp|log|sqrt|rsqrt|pow|neg|clamp|where|abs|lerp|nan_to_num|"
                    r"threshold|fill_|zero_|ones|zeros|empty|square|reciprocal|tanh|erf|sign|maximum|minimum"),
    ("reductions", r"sum|mean|max|min|norm|var|std|amax|all|any|isfinite"),
    ("stats bookkeeping (.item, sync)", r"item|_local_scalar_dense|is_nonzero"),
]


def section_of(name: str) -> str:
    low = name.lower()
    for section, pattern in SECTIONS:
        if re.search(pattern, name if section.startswith("custom") else low):
            return section
    return "other"


def profile_interleaved(steps: dict[str, tuple[Callable[[], object], int]], n: int) -> dict[str, dict[str, float]]:
    """Per side (name -> (step, threads)): self CPU seconds per iteration of every operator over
    `n` profiled iterations, the sides taking turns one iteration at a time (so load drift on a
    shared machine hits them alike). A custom autograd function (`_Name`, `_NameBackward`) also
    appears as '<name> (incl. inner ops)', its total time, which `sections` leaves out (its inner
    ops are already counted there)."""
    from torch.profiler import ProfilerActivity, profile

    acc: dict[str, dict[str, float]] = {k: {} for k in steps}
    for _ in range(n):
        for name, (step, threads) in steps.items():
            if threads > 0:
                torch.set_num_threads(threads)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                ops = acc[name]
                ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6 / n
                if re.match(r"^_[A-Z]", e.key):
                    k = f"{e.key} (incl. inner ops)"
                    ops[k] = ops.get(k, 0.0) + e.cpu_time_total / 1e6 / n
    return acc


def sections(ops: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, s in ops.items():
        if name.endswith("(incl. inner ops)"):
            continue
        out[section_of(name)] = out.get(section_of(name), 0.0) + s
    return out


def print_side_by_side(profiles: dict[str, dict[str, float]], ref: str, out: TextIO, top: int = 25) -> dict:
    """Sections and the `top` operators (by their largest time over the sides), ms per iteration,
    each side's and its ratio to `ref`'s. Returns {side: {section: ms}} for the JSON line."""
    names = list(profiles)
    secs = {k: sections(v) for k, v in profiles.items()}
    keys = sorted(set().union(*secs.values()), key=lambda k: -max(s.get(k, 0.0) for s in secs.values()))
    print(f"profile, self CPU ms per iteration: {' | '.join(names)}", file=out)
    for k in ["total", *keys]:
        vals = [sum(s.values()) if k == "total" else s.get(k, 0.0) for s in secs.values()]
        print(f"  {k:<34}" + "".join(f"{v * 1e3:10.2f}" for v in vals), file=out)
    ops = sorted(set().union(*profiles.values()), key=lambda k: -max(p.get(k, 0.0) for p in profiles.values()))
    print(f"  top operators ({ref} = reference):", file=out)
    for k in ops[:top]:
        vals = [p.get(k, 0.0) for p in profiles.values()]
        print(f"    {k[:44]:<44}" + "".join(f"{v * 1e3:10.2f}" for v in vals) + f"   [{section_of(k)}]", file=out)
    return {side: {k: v * 1e3 for k, v in s.items()} for side, s in secs.items()}
