"""One node's share of a multi-node job: started once per node by srun, it works out where the
job's nodes meet and replaces itself with torchrun.

    srun --nodes N --ntasks-per-node 1 --cpus-per-task C --kill-on-bad-exit=1 \\
        python -m sida.run.launch --nproc-per-node G -m -- stages.distill --config ...

Everything after `--nproc-per-node G` goes to torchrun unchanged. What a real cluster needs beyond
`torchrun --rdzv-endpoint <first node>:PORT`, and what this adds:
- The first node of the step hosts the rendezvous store (`--rdzv-conf is_host=1`, the others 0).
  Left to itself torch decides by matching host names to addresses, which fails where a node's
  name resolves to 127.0.1.1 (the Debian default) and then no node hosts it.
- Each node announces the address it reaches the other nodes from (`--local-addr`): the first
  node's becomes the workers' MASTER_ADDR, so it must be reachable from the others, not whatever
  `getfqdn()` says.
- gloo binds to the interface that reaches the other nodes (GLOO_SOCKET_IFNAME), unless the user
  set it: by default it binds to the address of the host name, loopback in the case above.
  NCCL keeps its own interface choice (it skips loopback and prefers InfiniBand); set
  NCCL_SOCKET_IFNAME yourself on nodes with several Ethernet interfaces.
- The port comes from the job id, so two jobs that share a first node do not collide (it stays
  below Linux's ephemeral range, 32768 and up).
Nothing here imports torch: it runs before torchrun, once per node.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import ConfigError

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class NodeRole:
    """Where this node stands in the step, and how it reaches the other nodes."""

    nodes: tuple[str, ...]  # the step's nodes in SLURM's order; the first hosts the rendezvous
    index: int
    local_addr: str | None  # the IPv4 address this node reaches its peer from
    ifname: str | None  # the interface that holds it

    @property
    def head(self) -> str:
        return self.nodes[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed node list (`node[01-03,07]`) as host names, in order."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    names = out.stdout.split()
    if out.returncode != 0 or not names:
        raise ConfigError(f"scontrol show hostnames {nodelist} failed: {(out.stderr or out.stdout).strip()[:300]}")
    return names


def rdzv_port(job_id: int) -> int:
    """A port per job: 20000-29999."""
    return 20000 + job_id % 10000


def interface_with_address(ip: str) -> str | None:
    """The name of the interface that holds IPv4 address `ip` (None when none does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def route_to(host: str) -> tuple[str | None, str | None]:
    """(local address, interface) this machine would use to reach `host` over IPv4; (None, None)
    when the host does not resolve to an IPv4 address. A UDP connect sends nothing: it only asks
    the kernel's routing table."""
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    except OSError:
        return None, None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        local = s.getsockname()[0]
    return local, interface_with_address(local)


def node_role(env: Mapping[str, str]) -> NodeRole:
    """This node's place in the srun step, from SLURM's environment."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    me = env.get("SLURMD_NODENAME")
    if not nodelist or not me:
        raise ConfigError("sida.run.launch runs inside a SLURM job step (srun): SLURM_JOB_NODELIST and "
                          "SLURMD_NODENAME are not set; on one machine use torchrun --standalone")
    nodes = tuple(expand_nodelist(nodelist))
    if me not in nodes:
        raise ConfigError(f"this node ({me}) is not in the step's node list {nodelist}")
    index = nodes.index(me)
    # The peer whose route matters: the head for every other node, the second node for the head.
    peer = nodes[1] if index == 0 and len(nodes) > 1 else nodes[0]
    local, ifname = route_to(peer) if len(nodes) > 1 else (None, None)
    return NodeRole(nodes=nodes, index=index, local_addr=local, ifname=ifname)


def torchrun_command(role: NodeRole, nproc_per_node: int, job_id: int, rest: Sequence[str],
                     python: str = sys.executable) -> list[str]:
    """The torchrun command line for this node (torchrun run as `python -m sida.run.torchrun`, so
    that it is the same Python as this launcher's and a failed stage ends with its one-line error
    rather than torchrun's traceback)."""
    cmd = [python, "-m", "sida.run.torchrun", "--nnodes", str(len(role.nodes)),
           "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"{role.head}:{rdzv_port(job_id)}", "--rdzv-id", str(job_id),
           "--rdzv-conf", f"is_host={int(role.index == 0)}"]
    if role.local_addr:
        cmd += ["--local-addr", role.local_addr]
    return cmd + list(rest)


def worker_env(role: NodeRole, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for torchrun: GLOO_SOCKET_IFNAME set to the interface that reaches the
    other nodes, unless the user chose one."""
    out = dict(env)
    if role.ifname and not out.get("GLOO_SOCKET_IFNAME"):
        out["GLOO_SOCKET_IFNAME"] = role.ifname
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--nproc-per-node" or not argv[1].isdigit():
        sys.exit("usage: python -m sida.run.launch --nproc-per-node G TORCHRUN_ARGS... (inside srun)")
    try:
        role = node_role(os.environ)
        job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    env = worker_env(role, os.environ)
    cmd = torchrun_command(role, int(argv[1]), job_id, argv[2:])
    print(f"[{role.nodes[role.index]}] node {role.index + 1}/{len(role.nodes)}: rendezvous at "
          f"{role.head}:{rdzv_port(job_id)}, reaching it from {role.local_addr or '?'} "
          f"(gloo on {env.get('GLOO_SOCKET_IFNAME', 'its default interface')})", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
