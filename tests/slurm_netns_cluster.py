"""A real multi-node SLURM cluster on this one machine: one controller and N compute nodes, each in
its own network namespace, for the multi-node test.

Layout (all of it created here, removed by `stop()`):
- network namespaces `<tag>-head` (the controller and login node: slurmctld, sbatch, Snakemake)
  and `<tag>-n1..nN` (one slurmd each). The head holds a bridge with 10.77.0.1/24; each node is
  joined to it by a veth pair and has 10.77.0.1K on its `eth0`. No address outside these
  namespaces is added or used.
- per command run on a machine, a UTS namespace with the machine's host name (`head`, `node1`,
  ...) and a mount namespace where <dir>/hosts is bound over /etc/hosts and <dir>/etc over
  /etc/slurm: the names resolve there as a cluster's DNS would resolve them, and every daemon,
  client and job step finds the cluster's slurm.conf where a cluster's nodes have it (the
  SLURM executor plugin drops SLURM_CONF from a job step's environment), while the real
  /etc/hosts and /etc/slurm are not touched. (Not
  `ip netns exec`: it mounts a fresh /sys, without the cgroup mounts, and slurmd 22.05 then
  refuses to start: "No filesystem mounted on /sys/fs/cgroup".)
- one directory for the config, the munge key and socket, state, spool, logs and pid files of
  every daemon (`%n` gives each slurmd its own). The file system is shared, as a cluster's
  is; one munged serves every node through its socket, with one key, as a cluster shares its key.

`stop()` cancels the jobs, then ends the daemons by the PIDs in their pid files and every other
process still inside the namespaces (by PID, found through /proc/PID/ns/net), and deletes the
namespaces. Clients run on the head machine: `cluster.run(cmd)`, or `cluster.on("head") + cmd`
with `cluster.env()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from slurm_cluster import Cluster, ClusterError, _node_hardware, _run, install, slurm_conf, start_daemon, stop_pid

SUBNET = "10.77.0"


class NetnsCluster(Cluster):
    tools = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "mount": "mount"}

    @staticmethod
    def impossible_reason() -> str | None:
        """Why namespaces with a bridge and veth pairs cannot be made here (None when they can):
        try it once in a scratch namespace."""
        install(NetnsCluster.tools)
        ns = f"sidaprobe{os.getpid()}"
        steps = [["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "add", "br0", "type", "bridge"],
                 ["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                 ["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--uts", "--mount", "--", "true"]]
        try:
            for cmd in steps:
                r = _run(cmd, timeout=30)
                if r.returncode != 0:
                    return f"`{' '.join(cmd)}` fails here: {(r.stderr or r.stdout).strip()[:200]}"
            return None
        finally:
            _run(["ip", "netns", "del", ns], timeout=30)

    def __init__(self, nodes: int = 2):
        self.tag = f"sida{os.getpid() % 100000}"
        self.names = [f"node{k}" for k in range(1, nodes + 1)]
        self.addrs = {"head": f"{SUBNET}.1", **{n: f"{SUBNET}.{10 + k}" for k, n in enumerate(self.names, 1)}}
        self.namespaces = {"head": f"{self.tag}-head", **{n: f"{self.tag}-n{k}" for k, n in enumerate(self.names, 1)}}
        self.root: Path | None = None
        self.pids: dict[str, int] = {}

    # -- paths and clients ---------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        """`base` (default: this process's environment) without SLURM_CONF: the machines read
        /etc/slurm/slurm.conf."""
        env = dict(base if base is not None else os.environ)
        env.pop("SLURM_CONF", None)
        return env

    def on(self, machine: str = "head") -> list[str]:
        """A prefix that runs the following command on `machine`: in its network namespace, under
        its host name, with its /etc/hosts and /etc/slurm."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[machine]}", "--",
                "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "sh", "-c", f'mount --bind {self.root / "hosts"} /etc/hosts && '
                            f'mount --bind {self.root / "etc"} /etc/slurm && hostname {machine} && exec "$@"', "sh"]

    def run(self, cmd: list[str], machine: str = "head", timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(self.on(machine) + cmd, timeout=timeout, env=self.env())

    def netns_inodes(self) -> dict[int, str]:
        """The inode of each namespace this cluster made -> its machine name."""
        out = {}
        for name, ns in self.namespaces.items():
            try:
                out[os.stat(f"/run/netns/{ns}").st_ino] = name
            except OSError:
                pass
        return out

    def processes(self) -> dict[int, tuple[str, list[str]]]:
        """PID -> (machine, argv) of every process inside this cluster's namespaces."""
        inodes = self.netns_inodes()
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                ino = os.stat(f"/proc/{entry}/ns/net").st_ino
                if ino in inodes:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                    out[int(entry)] = (inodes[ino], [a.decode(errors="replace") for a in argv if a])
            except OSError:  # gone meanwhile
                continue
        return out

    # -- set-up ----------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        r = _run(["ip", *args], timeout=30)
        if r.returncode != 0:
            raise ClusterError(f"ip {' '.join(args)} failed: {r.stderr.strip()[:300]}")

    def _network(self) -> None:
        head = self.namespaces["head"]
        for ns in self.namespaces.values():
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", head, "link", "add", "br0", "type", "bridge")
        self._ip("-n", head, "addr", "add", f"{self.addrs['head']}/24", "dev", "br0")
        self._ip("-n", head, "link", "set", "br0", "up")
        for k, name in enumerate(self.names, 1):
            ns = self.namespaces[name]
            self._ip("-n", head, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", head, "link", "set", f"v{k}", "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.addrs[name]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in self.addrs.items()))

    def _files(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/var/tmp"))
        os.chmod(self.root, 0o755)
        Path("/etc/slurm").mkdir(exist_ok=True)  # the mount point (slurm-wlm makes it too)
        for d in ("etc", "state", "log", *(f"spool/{n}" for n in self.names)):
            (self.root / d).mkdir(parents=True)
        munge = self.root / "munge"
        munge.mkdir()
        os.chmod(munge, 0o755)  # munged: the socket's directory must be searchable by all
        (munge / "munge.key").write_bytes(os.urandom(1024))
        os.chmod(munge / "munge.key", 0o400)
        for p in (munge, munge / "munge.key"):
            shutil.chown(p, "munge", "munge")
        hw = _node_hardware()
        # Every node reports all of this machine's memory: declare a share of it each.
        real_memory = max(512, int(int(hw.get("RealMemory", "2048")) * 0.8 / len(self.names)))
        self.conf.write_text(slurm_conf(
            f"a {len(self.names)}-node cluster in network namespaces {self.tag}-*", f"{self.tag}",
            ("head", self.addrs["head"]), [(n, self.addrs[n]) for n in self.names], hw, real_memory,
            slurm_user="root", pidfiles=(self.root / "slurmctld.pid", self.root / "slurmd-%n.pid"),
            state=str(self.root / "state"), spool=str(self.root / "spool" / "%n"),
            logs=(self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd-%n.log"),
            extra=f"AuthInfo=socket={munge / 'munge.socket'}\n"))

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.strip()
            if sorted(states.split()[1::2]) == ["idle"] * len(self.names):
                return
            time.sleep(0.5)
        raise ClusterError(f"the nodes did not become idle (sinfo: {states or 'nothing'}); "
                           f"see {self.root}/log/")

    def _prepare(self) -> None:
        self._files()
        self._network()

    def _start_daemons(self) -> None:
        munge = self.root / "munge"
        self.pids["munged"] = start_daemon("munged", [
            "runuser", "-u", "munge", "--", "munged", f"--socket={munge / 'munge.socket'}",
            f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"], munge / "munged.pid")
        # -c: start clean; -i: ignore state files of an earlier cluster of the same name
        self.pids["slurmctld"] = start_daemon(
            "slurmctld", self.on("head") + ["slurmctld", "-c", "-i"], self.root / "slurmctld.pid", env=self.env())
        for name in self.names:
            self.pids[f"slurmd {name}"] = start_daemon(
                f"slurmd on {name}", self.on(name) + ["slurmd"], self.root / f"slurmd-{name}.pid", env=self.env())

    # -- tear-down -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel the jobs, end every daemon and leftover process by PID, delete the namespaces."""
        if self.pids.get("slurmctld"):
            try:
                self.run(["scancel", "--full", "--user", "root"], timeout=30)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(["squeue", "-h"], timeout=30).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:  # a hung controller: the PIDs below end it all
                pass
        for name in [n for n in self.pids if n.startswith("slurmd")] + ["slurmctld"]:
            pid = self.pids.pop(name, None)
            if pid is not None:
                stop_pid(pid)
        # Whatever is left in the namespaces (job steps of a failed test): TERM, then KILL.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        pid = self.pids.pop("munged", None)
        if pid is not None:
            stop_pid(pid)
        for ns in self.namespaces.values():
            if os.path.exists(f"/run/netns/{ns}"):
                _run(["ip", "netns", "del", ns], timeout=30)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


if __name__ == "__main__":  # manual use: python tests/slurm_netns_cluster.py (Ctrl-C stops it)
    NetnsCluster().serve("clients run on the head machine: NetnsCluster.on('head') + [cmd]; ")
