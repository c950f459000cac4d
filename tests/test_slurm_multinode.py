"""Multi-node, run for real: a two-node SLURM cluster on this machine (tests/slurm_netns_cluster.py:
one slurmctld, two slurmd, each node in its own network namespace with its own address and host
name) runs a short distill stage of config/ci-short.yaml with `nodes: 2` through
`snakemake --profile slurm`. One process per node (gloo): the two rendezvous over TCP between the
namespaces (c10d, hosted by the first node; sida.run.launch), and the generator equals the same
run as one node with two processes. Then one node's process is killed mid-run, the job fails,
and the same command resumes the stage from its checkpoint and finishes with the same network.

Needs root and apt-get (Debian's slurm-wlm, munge, iproute2 are installed when missing) and a
kernel that lets root make network namespaces, bridges and veth pairs; skipped with the reason
otherwise. Every daemon and process is stopped by PID at the
end, also on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, Snakemake
from helpers import env as stage_env
from helpers import write_teacher
from slurm_cluster import ClusterError, unavailable_reason
from slurm_netns_cluster import NetnsCluster

pytestmark = pytest.mark.slow

CI = REPO / "config" / "ci-short.yaml"
EXP, RUN = "twonode", "mn"
OUT = f"results/{EXP}/{RUN}"


def _config(path: Path, nodes: int, procs: int) -> Path:
    """ci-short with one short run from the teacher: warm-up, then SiD (the generator moves),
    a checkpoint every 2 iterations of 32 images."""
    cfg = yaml.safe_load(CI.read_text())
    cfg.update(experiment=EXP, nodes=nodes, num_procs=procs, threads=1,
               resources={"default": {"mem_mb": 1000}})  # scheduling only: nothing enforces it here
    cfg["distill"].update(tick_kimg=0.064, snapshot_kimg=0.064, runs={RUN: {
        "init": "teacher", "evaluate": False,
        "phases": [{"kind": "warmup", "kimg": 0.064}, {"kind": "sid", "kimg": 0.448}]}})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cluster(request):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        reason = NetnsCluster.impossible_reason()
    except ClusterError as exc:  # apt-get could not install iproute2 / util-linux
        pytest.fail(f"could not install what the two-node cluster needs: {exc}")
    if reason:
        pytest.skip(f"two SLURM nodes in network namespaces cannot be made here: {reason}")
    c = NetnsCluster(nodes=2)
    request.addfinalizer(c.stop)
    start = time.monotonic()
    try:
        c.start()
        print(f"two-node cluster up: {time.monotonic() - start:.1f} s")
    except ClusterError as exc:
        pytest.fail(f"could not start the two-node SLURM cluster: {exc}")
    return c


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The two-node config, an (untrained) teacher, and the reference: the same run as one node
    with two processes (torchrun --standalone)."""
    d = tmp_path_factory.mktemp("inputs")
    cfg2 = _config(d / "two-nodes.yaml", nodes=2, procs=1)
    cfg1 = _config(d / "one-node.yaml", nodes=1, procs=2)
    teacher = write_teacher(d / "teacher.pt", yaml.safe_load(cfg2.read_text()))
    ref = d / "ref"
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "--", "stages.distill",
                        "--config", str(cfg1), "--run", RUN, "--teacher", str(teacher), "--out", str(ref)],
                       cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    print(f"reference, one node with two processes: {time.monotonic() - start:.0f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(16 x 1 rounds x 2 processes)" in r.stderr
    return cfg2, teacher, ref


def _workdir(tmp_path: Path, teacher: Path) -> Snakemake:
    """A work dir whose teacher stage is done (its network in place): the DAG is the run alone."""
    (tmp_path / "results" / EXP / "teacher").mkdir(parents=True)
    shutil.copy(teacher, tmp_path / "results" / EXP / "teacher" / "network.pt")
    return Snakemake(tmp_path)


def _snakemake(sm: Snakemake, cluster: NetnsCluster, cfg: Path) -> subprocess.CompletedProcess:
    """`snakemake --profile slurm` typed on the cluster's login node, from the repository root,
    with what a cluster without accounting needs (squeue for job states, fast polling)."""
    sm.env = cluster.env(dict(sm.env, PYTHONPATH=str(REPO), WANDB_MODE="disabled"))
    return sm(f"{OUT}/network.pt", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
              "--slurm-logdir", str(sm.workdir / "slurm_logs"), "--latency-wait", "5", "--retries", "0",
              profile="slurm", as_typed=True, configfile=cfg, timeout=400, prefix=cluster.on("head"))


def _stage_processes(cluster: NetnsCluster, machine: str | None = None) -> list[int]:
    """PIDs of the stage's worker processes (`python -u -m stages.distill ...`, not torchrun's
    agent) on one machine of the cluster, or on any."""
    return [pid for pid, (m, argv) in cluster.processes().items()
            if (machine is None or m == machine) and "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["stages.distill"]]


def _networks_close(a: Path, b: Path, exact: bool = False) -> None:
    from sida.io import checkpoints

    na, nb = checkpoints.load_network(a).state_dict(), checkpoints.load_network(b).state_dict()
    assert na.keys() == nb.keys()
    for k in na:
        if exact:
            assert torch.equal(na[k], nb[k]), k
        else:
            torch.testing.assert_close(na[k], nb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def two_node_run(cluster, inputs, tmp_path_factory):
    cfg2, teacher, _ = inputs
    sm = _workdir(tmp_path_factory.mktemp("twonode"), teacher)
    start = time.monotonic()
    r = _snakemake(sm, cluster, cfg2)
    print(f"two-node distill through SLURM: {time.monotonic() - start:.0f} s")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return sm, r


def test_two_nodes_rendezvous_and_equal_one_node_with_two_processes(cluster, inputs, two_node_run):
    _, teacher, ref = inputs
    sm, r = two_node_run
    out = r.stdout + r.stderr
    assert len(set(_submitted(out))) == 1, out[-3000:]  # the run alone, as one SLURM job of two nodes
    log = (sm.workdir / "results" / EXP / "logs" / "distill" / f"{RUN}.log").read_text()
    # One torchrun per node, each in its own namespace with its own address, meeting at node1.
    for k in (1, 2):
        assert (f"[node{k}] node {k}/2: rendezvous at node1:" in log
                and f"reaching it from {cluster.addrs[f'node{k}']} (gloo on eth0)" in log), log[-3000:]
    assert "(16 x 1 rounds x 2 processes)" in log
    # The generator trained (it left the teacher) and equals the one-node, two-process run.
    net = sm.workdir / OUT / "network.pt"
    with pytest.raises(AssertionError):
        _networks_close(net, teacher)
    _networks_close(net, ref / "network.pt")
    assert not _stage_processes(cluster)


def test_killing_one_nodes_process_fails_the_job_and_a_rerun_resumes(cluster, inputs, two_node_run, tmp_path):
    cfg2, teacher, _ = inputs
    sm = _workdir(tmp_path, teacher)
    checkpoint = tmp_path / OUT / "work" / "state.pt"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(r=_snakemake(sm, cluster, cfg2)))
    start = time.monotonic()
    runner.start()
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and runner.is_alive() and time.monotonic() < deadline:
            if checkpoint.exists():
                pids = _stage_processes(cluster, "node2")
                if pids:
                    os.kill(pids[0], signal.SIGKILL)  # node2's training process dies mid-run
                    killed = pids[0]
            time.sleep(0.05)
    finally:
        runner.join(timeout=450)
    r = result["r"]
    print(f"two-node run killed after its first checkpoint, until Snakemake stopped: {time.monotonic() - start:.0f} s")
    assert killed is not None, "no checkpoint while the stage ran: " + (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    assert not (tmp_path / OUT / "network.pt").exists(), "the run finished before the kill: make it longer"
    assert checkpoint.exists()
    out = r.stdout + r.stderr
    assert f"Error in rule {RUN}" in out and f"logs/distill/{RUN}.log" in out  # the failed rule, its log
    # srun ended node1's process too (--kill-on-bad-exit), instead of leaving it in a collective.
    assert not _stage_processes(cluster)
    assert cluster.run(["squeue", "-h"]).stdout.strip() == ""

    start = time.monotonic()
    r2 = _snakemake(sm, cluster, cfg2)
    print(f"rerun, resumed: {time.monotonic() - start:.0f} s")
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-6000:]
    log = (tmp_path / "results" / EXP / "logs" / "distill" / f"{RUN}.log").read_text()
    assert f"{RUN}: resuming from {OUT}/work/state.pt" in log, log[-3000:]
    assert not checkpoint.exists()
    # Resuming is bit-exact: the same network as the uninterrupted two-node run.
    _networks_close(tmp_path / OUT / "network.pt", two_node_run[0].workdir / OUT / "network.pt", exact=True)


def _submitted(out: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", out)
