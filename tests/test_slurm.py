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
