"""sida.run.launch: one node's torchrun command in a multi-node SLURM step (fast; the real thing
runs in tests/test_slurm_multinode.py on a two-node cluster)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sida.errors import ConfigError
from sida.run import launch
from sida.run.launch import NodeRole

REST = ["-m", "--", "stages.distill", "--config", "c.yaml", "--run", "sid"]


def _opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_head_hosts_the_rendezvous_and_the_others_join_it():
    nodes = ("gpu-a01", "gpu-a02", "gpu-a03")
    head = launch.torchrun_command(NodeRole(nodes, 0, "10.1.0.5", "ib0"), 4, 123456, REST, python="py")
    other = launch.torchrun_command(NodeRole(nodes, 2, "10.1.0.7", "ib0"), 4, 123456, REST, python="py")
    for cmd in (head, other):
        assert cmd[:3] == ["py", "-m", "sida.run.torchrun"]
        assert _opt(cmd, "--nnodes") == "3" and _opt(cmd, "--nproc-per-node") == "4"
        assert _opt(cmd, "--rdzv-backend") == "c10d" and _opt(cmd, "--rdzv-id") == "123456"
        # every node meets at the first node, on a port of this job
        assert _opt(cmd, "--rdzv-endpoint") == f"gpu-a01:{20000 + 123456 % 10000}"
        assert cmd[-len(REST):] == REST  # the stage's arguments follow unchanged
    assert _opt(head, "--rdzv-conf") == "is_host=1" and _opt(other, "--rdzv-conf") == "is_host=0"
    assert _opt(head, "--local-addr") == "10.1.0.5" and _opt(other, "--local-addr") == "10.1.0.7"


def test_ports_differ_between_jobs_and_stay_below_the_ephemeral_range():
    ports = {launch.rdzv_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 30000 for p in ports)


def test_gloo_interface_is_set_unless_the_user_chose_one():
    role = NodeRole(("a", "b"), 1, "10.0.0.2", "eth1")
    assert launch.worker_env(role, {"PATH": "/bin"}) == {"PATH": "/bin", "GLOO_SOCKET_IFNAME": "eth1"}
    assert launch.worker_env(role, {"GLOO_SOCKET_IFNAME": "ib0"})["GLOO_SOCKET_IFNAME"] == "ib0"
    unknown = NodeRole(("a", "b"), 1, None, None)
    assert "GLOO_SOCKET_IFNAME" not in launch.worker_env(unknown, {})
    assert "--local-addr" not in launch.torchrun_command(unknown, 1, 7, REST)


def test_loopback_route_and_interface():
    assert launch.interface_with_address("127.0.0.1") == "lo"
    assert launch.interface_with_address("192.0.2.77") is None  # TEST-NET-1: on no interface here
    assert launch.route_to("127.0.0.1") == ("127.0.0.1", "lo")
    assert launch.route_to("no-such-host.invalid") == (None, None)


def test_node_role_routes_to_the_head_or_from_the_head_to_the_second_node(monkeypatch):
    monkeypatch.setattr(launch, "expand_nodelist", lambda nl: {"n[1-3]": ["n1", "n2", "n3"]}[nl])
    asked = []
    monkeypatch.setattr(launch, "route_to", lambda host: asked.append(host) or ("10.0.0.9", "eth0"))
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_NODELIST": "n[1-3]", "SLURMD_NODENAME": "n3"}
    role = launch.node_role(env)
    assert (role.nodes, role.index, role.head, role.local_addr, role.ifname) == (("n1", "n2", "n3"), 2, "n1",
                                                                                  "10.0.0.9", "eth0")
    assert launch.node_role({**env, "SLURMD_NODENAME": "n1"}).index == 0
    assert asked == ["n1", "n2"]
    with pytest.raises(ConfigError, match=r"this node \(n9\) is not in the step's node list n\[1-3\]"):
        launch.node_role({**env, "SLURMD_NODENAME": "n9"})


def test_outside_slurm_is_one_error_line(monkeypatch, capsys):
    for k in ("SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURMD_NODENAME"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as exc:
        launch.main(["--nproc-per-node", "2", "-m", "--", "stages.distill"])
    assert str(exc.value).startswith("error: sida.run.launch runs inside a SLURM job step (srun)")
    with pytest.raises(SystemExit) as exc:
        launch.main(["-m", "stages.distill"])
    assert str(exc.value).startswith("usage: python -m sida.run.launch --nproc-per-node G")


def test_the_launcher_does_not_import_torch():
    """It runs once per node before torchrun: importing torch there costs seconds for nothing."""
    code = "import sys, sida.run.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0

