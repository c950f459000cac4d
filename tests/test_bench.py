"""Smoke test of the distillation-step benchmark (bench.step) at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"images_per_sec", "images_per_sec_best", "floor_ratio"}


@pytest.mark.parametrize("extra", [["--phase", "sid"], ["--phase", "sida", "--compare-separate", "--channels-last"],
                                   ["--phase", "sida", "--procs", "2"], ["--phase", "sid", "--flops", "--profile", "1"]])
def test_bench_step_prints_json_last(extra):
    cmd = [sys.executable, "-m", "bench.step", "--res", "8", "--channels", "1", "--batch", "4",
           "--model-channels", "8", "--channel-mult", "1,2", "--attn-res", "4", "--num-blocks", "1",
           "--iters", "1", "--warmup", "0", "--threads", "1", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) > 1  # human-readable lines come first
    result = json.loads(lines[-1])
    assert KEYS <= set(result)
    assert result["images_per_sec"] > 0 and result["images_per_sec_best"] >= result["images_per_sec"]
    assert result["floor_ratio"] > 0
    if "--compare-separate" in extra:
        assert result["batched_speedup_vs_separate"] > 0
    if "--flops" in extra:  # counted FLOPs; the convolutions' rate from the profiled iteration
        assert 0 < result["conv_gflop_per_iter"] <= result["gflop_per_iter"]
        assert result["conv_gflops"] > 0 and result["sgemm_gflops"] > 0 and result["gflops_achieved"] > 0
        assert "convolutions:" in out.stderr
    # --procs: the benchmark re-ran itself as a 2-process job; only rank 0 printed
    assert (result["procs"], result["threads_per_proc"]) == ((2, 1) if "--procs" in extra else (1, 1))
    assert out.stdout.count("[bench.step]") == 1
