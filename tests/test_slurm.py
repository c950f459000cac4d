"""The embedded DAG (config/ci-short.yaml) on a real one-node SLURM cluster started on this machine.

Installs Debian's slurm-wlm and munge when missing (root and apt-get needed, else skipped), starts
munged, slurmctld and slurmd (tests/slurm_cluster.py) and runs the workflow as users type it,
`snakemake --profile slurm` from the repository root (`-d` a temporary work dir), with the
settings a cluster without accounting needs (squeue status, fast polling). The daemons are
stopped by PID when the module ends.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from conftest import REPO, Snakemake
from slurm_cluster import ClusterError, SlurmCluster, unavailable_reason

CI = REPO / "config" / "ci-short.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster(request):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    request.addfinalizer(cluster.stop)
    try:
        cluster.start()
    except ClusterError as exc:
        pytest.fail(f"could not start the one-node SLURM cluster: {exc}")
    return cluster


def test_embedded_dag_runs_on_slurm(slurm_cluster, tmp_path):
    sm = Snakemake(tmp_path)
    logdir = tmp_path / "slurm_logs"
    start = time.monotonic()
    r = sm(
        # A cluster without accounting: sacct cannot report job states (the plugin would wait
        # forever); squeue can, given MinJobAge >= 3 x the first status check delay.
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1",
        "--seconds-between-status-checks", "1",
        "--slurm-logdir", str(logdir),
        "--latency-wait", "5",
        "--retries", "0",
        profile="slurm", as_typed=True, configfile=CI, timeout=420,
    )
    elapsed = time.monotonic() - start
    print(f"ci-short DAG on SLURM: {elapsed:.0f} s")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]

    exp = tmp_path / "results" / "ci-short"
    for f in ["teacher/network.pt", "sid/network.pt", "sida/state.pt", "sid2a/network.pt",
              "evaluate/teacher/metrics.json", "evaluate/sid2a/samples.png", "report/report.html",
              "logs/distill/sida.log"]:
        assert (exp / f).is_file(), f
    # Every rule ran as its own SLURM job, and the logs of successful jobs are kept.
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == 10, out[-4000:]  # teacher, 4 runs, 4 evaluations, report
    for rule in ["teacher", "warmup", "sid", "sida", "sid2a", "report"]:
        assert list((logdir / f"rule_{rule}").glob("*.log")), f"no SLURM log for {rule}"
    assert "Report: results/ci-short/report/report.html" in out
    # Nothing left in the queue.
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30).stdout.strip()
    assert queue == ""


def _preempt_once(stage_log, timeout: float = 300) -> None:
    """`scancel --signal=USR1` the running job once its stage has logged its first tick (as a
    preemption's early warning would come; the workflow runs one job at a time here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stage_log.is_file() and "kimg" in stage_log.read_text():
            jobs = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            if jobs:
                subprocess.run(["scancel", "--signal=USR1", *jobs], timeout=30)
                return
        time.sleep(1)


def test_preempted_and_time_limited_distill_job_finishes_through_resubmissions(slurm_cluster, tmp_path):
    """A distill job preempted once (`scancel --signal=USR1` once its stage is training) and whose
    time limit (2 min) is shorter than its run: SLURM's early SIGTERM
    (`slurm.signal_seconds` before the limit, `--signal=TERM@N` from the workflow) makes the stage
    write its checkpoint and exit 75; Snakemake resubmits (retries) and the next job resumes. The
    network is bit-identical to an uninterrupted run's, and each job's SLURM log shows its stop.
    `SIDA_SLOW_ITER` (a test hook) makes each iteration last 2 s so the run outlasts the limit.
    (SLURM may send the signal up to 60 s early: with a 1-minute limit it could come while the
    job's Snakemake is still starting, before anything handles it.)"""
    import yaml

    exp = "preempt"
    cfg = yaml.safe_load(CI.read_text())
    cfg.update(experiment=exp, slurm={"signal_seconds": 30}, resources={"distill": {"runtime": 2}})
    cfg["teacher"].update(kimg=0.128, snapshot_kimg=0.128, tick_kimg=0.128)  # 2 iterations
    cfg["distill"]["runs"] = {"warmup": {"init": "teacher", "phases": [{"kind": "warmup", "kimg": 1.28}],
                                         "evaluate": False}}  # 40 iterations of 32: over 80 s
    configfile = tmp_path / "preempt.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sm = Snakemake(tmp_path)
    sm.env["SIDA_SLOW_ITER"] = "2"
    logdir = tmp_path / "slurm_logs"
    start = time.monotonic()
    stage_log = tmp_path / "results" / exp / "logs" / "distill" / "warmup.log"
    preempt = threading.Thread(target=_preempt_once, args=(stage_log,), daemon=True)
    preempt.start()
    r = sm(f"results/{exp}/warmup/network.pt",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
           "--seconds-between-status-checks", "1", "--slurm-logdir", str(logdir), "--latency-wait", "5",
           profile="slurm", as_typed=True, configfile=configfile, timeout=900)
    print(f"time-limited distill on SLURM: {time.monotonic() - start:.0f} s")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    logs = sorted((logdir / "rule_warmup").glob("*.log"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    texts = [p.read_text() for p in logs]
    stops = [m.group(1) for t in texts for m in [re.search(r"stopped by (SIG\w+) at [0-9.]+ kimg: checkpoint \S+ "
                                                             r"written", t)] if m]
    assert len(logs) >= 3 and len(stops) == len(logs) - 1, "\n----\n".join(t[-1500:] for t in texts)
    assert stops.count("SIGUSR1") == 1 and set(stops) == {"SIGUSR1", "SIGTERM"}, stops  # preemption, time limits
    assert "resuming from" in stage_log.read_text(), stage_log.read_text()[-2000:]
    # The same run uninterrupted, outside SLURM: bit-identical outputs.
    res = tmp_path / "results" / exp
    ref = tmp_path / "ref"
    done = subprocess.run(["python", "-m", "stages.distill", "--config", str(res / "config.yaml"), "--run", "warmup",
                           "--teacher", str(res / "teacher" / "network.pt"), "--out", str(ref)],
                          cwd=REPO, env={k: v for k, v in sm.env.items() if k != "SIDA_SLOW_ITER"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("network.pt", "state.pt"):
        assert (ref / name).read_bytes() == (res / "warmup" / name).read_bytes(), name
