"""A training stage's time accounting (sida.train.driver.Timings, run): the logged img/s is the
iteration rate, and evaluations, snapshots and checkpoints are timed apart. A fake clock makes
every duration exact, so nothing here depends on the machine's speed."""

from __future__ import annotations

import pytest
import torch

from sida.run.dist import DistInfo
from sida.train import driver as driver_mod
from sida.train.driver import Timings, run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeLoop:
    """Each step takes `step_s` on the clock; one image batch of 10."""

    def __init__(self, clock: Clock, step_s: float) -> None:
        self.clock, self.step_s = clock, step_s
        self.nimg, self.batch, self.gens = 0, 10, {}

    def step(self) -> dict[str, torch.Tensor]:
        self.clock.now += self.step_s
        return {"loss": torch.tensor(1.0)}

    def phase_name(self) -> str:
        return "sid"


class FakeCheckpointer:
    def __init__(self, clock: Clock) -> None:
        self.clock, self.saves = clock, 0
        self.driver: dict = {}  # what a resumed run's driver state would be: none here

    def save(self, loop, driver: dict | None = None) -> None:
        self.clock.now += 2.0
        self.saves += 1


def test_logged_rate_is_the_iteration_rate_and_the_rest_is_accounted(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(driver_mod.time, "perf_counter", clock)
    timings = Timings()
    clock.now += 3.0  # set-up before the loop
    lp, ck = FakeLoop(clock, step_s=0.5), FakeCheckpointer(clock)
    rows = []

    def on_tick(row):
        with timings("evaluation"):
            clock.now += 7.0
        rows.append(row)

    def on_snapshot():
        clock.now += 1.0

    info = DistInfo(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"))  # no progress lines
    out = run(lp, total_nimg=100, tick_kimg=0.04, snapshot_kimg=0.03, checkpointer=ck, info=info,
              on_tick=on_tick, on_snapshot=on_snapshot, timings=timings)
    assert out is timings
    # 10 iterations of 0.5 s at 10 images: 20 img/s in every tick, whatever else happened.
    assert [r["images_per_sec"] for r in rows] == [pytest.approx(20.0)] * 3
    rep = timings.report()
    assert rep["iterations_s"] == pytest.approx(5.0)
    assert rep["evaluation_s"] == pytest.approx(21.0)  # 3 ticks (40, 80, 100 images)
    assert ck.saves == 3 and rep["checkpoint_s"] == pytest.approx(6.0)  # at 30, 60, 90 images
    assert rep["snapshot_s"] == pytest.approx(3.0)
    assert rep["wall_s"] == pytest.approx(3.0 + 5.0 + 21.0 + 6.0 + 3.0)
    assert rep["setup_s"] == pytest.approx(3.0)
    assert rep["other_s"] == pytest.approx(0.0)
    assert rep["images_per_sec"] == pytest.approx(20.0)
    # Iterations over the wall time outside evaluations and checkpoints: 5 / (38 - 21 - 6).
    assert rep["iteration_share"] == pytest.approx(5.0 / 11.0)
    assert "20.0 img/s over the iterations" in timings.line()


@pytest.mark.slow
def test_distill_stage_logs_the_iteration_rate_and_times_evaluations_apart(tmp_path, stage_inputs):
    """The real stage (about a minute on 2 loaded cores): its last line splits the wall time, the
    in-training evaluations and checkpoint writes have their own non-zero times, the logged img/s
    of every tick is the iteration rate (images over iteration seconds, the same figures as the
    summary), and the summary's `time/*` shares add up."""
    import json
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import run_module, tiny_config

    cfg = tiny_config(tick_kimg=0.016, snapshot_kimg=0.032)
    cfg["distill"]["runs"]["mixed"]["phases"] = [{"kind": "warmup", "kimg": 0.016}, {"kind": "sid", "kimg": 0.048}]
    cfg["evaluate"] = {"batch": 64, "reference_max_images": 64, "classifier": {"epochs": 1},
                       "during_training": {"every_kimg": 0.032, "num_samples": 16}}
    config, teacher = stage_inputs(tmp_path, cfg)
    out = tmp_path / "out"
    res = run_module("stages.distill", "--config", str(config), "--run", "mixed", "--teacher", str(teacher),
                     "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("mixed: wall ")]
    assert len(line) == 1 and "img/s over the iterations" in line[0], res.stderr[-3000:]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if "final/time/wall_s" in r)
    t = {k[len("final/time/"):]: v for k, v in final.items() if k.startswith("final/time/")}
    assert t["evaluation_s"] > 0 and t["checkpoint_s"] > 0 and t["iterations_s"] > 0 and t["setup_s"] > 0
    parts = sum(t[f"{k}_s"] for k in Timings.KINDS) + t["other_s"]
    assert parts == pytest.approx(t["wall_s"], abs=0.01)
    # 4 iterations of 16 images; the summary rounds seconds to 1 ms, so the rate is bounded by
    # the rounding interval, not equal within a fixed relative tolerance (a 0.3 s run is 0.17 %).
    it_lo, it_hi = t["iterations_s"] - 0.0005, t["iterations_s"] + 0.0005
    assert 64 / it_hi <= t["images_per_sec"] * (1 + 1e-9) and t["images_per_sec"] <= 64 / it_lo * (1 + 1e-9)
    ticks = [r for r in records if "images_per_sec" in r]
    assert len(ticks) == 4
    # Each tick's rate is 16 images over that tick's iteration time: their harmonic mean is the
    # run's iteration rate, whatever the evaluations between them took.
    harmonic = len(ticks) / sum(1 / r["images_per_sec"] for r in ticks)
    assert harmonic == pytest.approx(t["images_per_sec"], rel=1e-3)
    assert float(re.search(r"([\d.]+) img/s over", line[0]).group(1)) == pytest.approx(t["images_per_sec"], abs=0.06)
