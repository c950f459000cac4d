"""A real one-node SLURM cluster on this machine, for the SLURM end-to-end test.

Follows ../shared/notes/slurm-on-one-machine.md (Debian's slurm-wlm + munge, no systemd, no
cgroups): install the packages when missing, write a one-node slurm.conf for localhost, start
munged, slurmctld and slurmd (each daemonizes and writes a pid file) and wait for the node to be
idle. `stop()` ends exactly the daemons this object started, by the PIDs in their pid files.

    cluster = SlurmCluster(); cluster.start(); ...; cluster.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
RUN = Path("/run")
PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}


class ClusterError(RuntimeError):
    """The cluster could not be set up (message says which step)."""


def unavailable_reason() -> str | None:
    """Why a cluster cannot be made here (None when it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM test needs root (it installs slurm-wlm and munge and starts their daemons)"
    if not (shutil.which("slurmctld") and shutil.which("munged")) and not shutil.which("apt-get"):
        return "the SLURM test needs apt-get to install slurm-wlm and munge (Debian/Ubuntu)"
    return None


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def install(tools: dict[str, str] | None = None) -> None:
    """apt-get install slurm-wlm munge when their daemons are not there yet (~15 s), and the
    package of each missing command in `tools` (command -> Debian package)."""
    missing = [] if all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged")) else list(PACKAGES)
    missing += sorted({pkg for cmd, pkg in (tools or {}).items() if not shutil.which(cmd)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        r = _run(cmd, timeout=600, env=env)
        if r.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")


def _node_hardware() -> dict:
    """CPUs, sockets, cores, threads and memory as `slurmd -C` reports them."""
    out = _run(["slurmd", "-C"]).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    if "CPUs" not in fields:
        raise ClusterError(f"slurmd -C printed no hardware description: {out.strip()[:300]}")
    return fields


def slurm_conf(purpose: str, cluster: str, controller: tuple[str, str], nodes: list[tuple[str, str]],
               hw: dict, real_memory: int, slurm_user: str, pidfiles: tuple, state: str, spool: str,
               logs: tuple, extra: str = "") -> str:
    """slurm.conf for a cluster without systemd, cgroups or accounting (see
    ../shared/notes/slurm-on-one-machine.md). `controller` and `nodes` are (name, address);
    every node declares this machine's hardware (`slurmd -C`) and `real_memory` MB."""
    node_lines = "".join(
        f"NodeName={name} NodeAddr={addr} CPUs={hw['CPUs']} Boards={hw.get('Boards', 1)} "
        f"SocketsPerBoard={hw.get('SocketsPerBoard', 1)} CoresPerSocket={hw.get('CoresPerSocket', hw['CPUs'])} "
        f"ThreadsPerCore={hw.get('ThreadsPerCore', 1)} RealMemory={real_memory} State=UNKNOWN\n"
        for name, addr in nodes)
    return f"""\
# Written by the tests: {purpose}.
ClusterName={cluster}
SlurmctldHost={controller[0]}({controller[1]})
SlurmUser={slurm_user}
SlurmctldPidFile={pidfiles[0]}
SlurmdPidFile={pidfiles[1]}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldLogFile={logs[0]}
SlurmdLogFile={logs[1]}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
{extra}{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_daemon(name: str, cmd: list[str], pidfile: Path, env: dict | None = None) -> int:
    """Run a daemon's start command (it forks and writes `pidfile`); its PID."""
    pidfile.unlink(missing_ok=True)
    r = _run(cmd, timeout=60, env=env)
    if r.returncode != 0:
        raise ClusterError(f"{name} did not start: {(r.stderr or r.stdout).strip()[-500:]}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if pidfile.is_file() and pidfile.read_text().strip().isdigit():
            return int(pidfile.read_text().strip())
        time.sleep(0.2)
    raise ClusterError(f"{name} wrote no pid file {pidfile}")


def stop_pid(pid: int, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; quiet if it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Cluster:
    """Start and stop shared by the test clusters: `start()` installs the packages, runs
    `_prepare` (files, network), `_start_daemons` and `_wait_idle`, and stops whatever it had
    started when any step fails; `stop()` must end exactly what was started, by PID."""

    pids: dict[str, int]
    tools: dict[str, str] = {}  # commands the cluster needs besides SLURM's -> Debian package

    def _prepare(self) -> None:
        raise NotImplementedError

    def _start_daemons(self) -> None:
        raise NotImplementedError

    def _wait_idle(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self):
        install(self.tools)
        try:
            self._prepare()
            self._start_daemons()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def serve(self, how_to_use: str = "") -> None:
        """Manual use: start, print the PIDs, run until Ctrl-C or SIGTERM, stop."""
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        self.start()
        print(f"cluster up: {self.pids}; {how_to_use}Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.stop()


class SlurmCluster(Cluster):
    def __init__(self):
        self.host = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}

    # -- set-up --------------------------------------------------------------------------------
    def _ensure_host_resolves(self) -> None:
        try:
            socket.gethostbyname(self.host)
        except OSError:
            with open("/etc/hosts", "a") as f:
                f.write(f"\n127.0.0.1 {self.host}\n")

    def _setup_munge(self) -> None:
        etc = MUNGE_KEY.parent
        etc.mkdir(parents=True, exist_ok=True)
        if not MUNGE_KEY.is_file() or MUNGE_KEY.stat().st_size < 32:
            MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        os.chmod(MUNGE_KEY, 0o400)
        shutil.chown(etc, "munge", "munge")
        os.chmod(etc, 0o700)
        for d in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        os.chmod("/run/munge", 0o755)

    def _write_conf(self) -> None:
        hw = _node_hardware()
        mem = int(hw.get("RealMemory", "2048"))
        real_memory = max(512, int(mem * 0.9))  # above what slurmd detects, the node drains
        for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "slurm", "slurm")
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(slurm_conf(
            "a one-node cluster on localhost for the SLURM test", "sidatest", (self.host, "127.0.0.1"),
            [(self.host, "127.0.0.1")], hw, real_memory, slurm_user="slurm",
            pidfiles=(PIDFILES["slurmctld"], PIDFILES["slurmd"]), state="/var/spool/slurmctld",
            spool="/var/spool/slurmd", logs=("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log")))

    def _start(self, name: str, cmd: list[str]) -> None:
        self.pids[name] = start_daemon(name, cmd, PIDFILES[name])

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = _run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.strip()
            if state.startswith("idle") or state.startswith("mixed"):
                return
            if "drain" in state or "down" in state:
                _run(["scontrol", "update", f"nodename={self.host}", "state=resume"])
            time.sleep(0.5)
        raise ClusterError(f"the node did not become idle (state: {state or 'unknown'}); "
                           f"see /var/log/slurm/slurmctld.log and slurmd.log")

    def _prepare(self) -> None:
        self._ensure_host_resolves()
        self._setup_munge()
        self._write_conf()

    def _start_daemons(self) -> None:
        self._start("munged", ["runuser", "-u", "munge", "--", "munged"])
        # -c: start clean, without jobs or node states saved by an earlier test cluster.
        self._start("slurmctld", ["slurmctld", "-c"])
        self._start("slurmd", ["slurmd"])

    # -- tear-down -----------------------------------------------------------------------------
    def stop(self) -> None:
        """End the daemons this object started (by PID), slurmd first."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                stop_pid(pid)


if __name__ == "__main__":  # manual use: python tests/slurm_cluster.py (Ctrl-C or SIGTERM stops it)
    SlurmCluster().serve()
