"""How the workflow's jobs run: resources per rule, the command that starts a stage's processes,
the jobs' shell prefix, signal handling inside SLURM jobs and the profile-shadow note.

Commands are built as lists of arguments and joined into the shell string Snakemake needs in one
place, `shell_join`. Paths and the DAG are in `sida.run.workflow`; both are tested without
Snakemake (tests/test_workflow_module.py).
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Mapping, Sequence

from .config import rule_procs as config_rule_procs

# Rules that start `num_procs` processes per node with torchrun (and `nodes` nodes when
# training); the others are one process.
DISTRIBUTED = {"teacher": True, "distill": True, "evaluate": True, "fetch": False, "report": False}
MULTI_NODE = frozenset({"teacher", "distill"})

# Runtime (minutes) and memory (MB) per job. On CPU sized for the embedded default (digits on a
# laptop); on GPUs for a preset's long runs (per-GPU memory scaled by the processes, `* procs`).
# Presets and users override them with a `resources` section (per rule name), e.g.
#   resources: {default: {slurm_partition: gpu}, distill: {runtime: 2880, mem_mb: 64000}}
# Per rule: (runtime, mem_mb, whether mem_mb is per process).
GPU_RESOURCES = {
    "teacher": (2880, 16000, True), "fetch": (60, 8000, False), "distill": (2880, 16000, True),
    "evaluate": (240, 16000, True), "report": (10, 2000, False),
}
CPU_RESOURCES = {
    "teacher": (60, 4000, False), "fetch": (30, 4000, False), "distill": (60, 4000, False),
    "evaluate": (60, 4000, False), "report": (10, 2000, False),
}

TORCHRUN = ["python", "-m", "sida.run.torchrun"]
# SLURM signals every process of a job step, the job's shell too, which would die of SIGTERM
# while its stage writes the checkpoint (and the step would end, killing the stage): the shell
# ignores it, the stage's launcher handles it (sida.run.torchrun, sida.run.signals).
KEEP_SHELL = "trap '' TERM; "

# Every job's shell starts with this (Snakemake's `shell.prefix`, which formats it: hence the
# doubled braces): strict mode and `stage_failed RULE LOG`, which each rule calls when its stage
# fails (the stage's output goes to the rule's log). It repeats the stage's one-line error (the
# first `error: ...` line of the log: torchrun's own report follows it, so the last line is not
# it) with the log path, then fails the job: with status 75 when the stage stopped on a signal
# after writing its checkpoint (its last line says so), else 1.
SHELL_PREFIX = (
    "set -euo pipefail; "
    "stage_failed() {{ rc=$?; echo \"[$1] $(grep -m 1 -E '^(\\[rank [0-9]+\\] )?error: ' \"$2\" "
    "|| tail -n 1 \"$2\") (log: $2)\" >&2; [ $rc = 75 ] && exit 75; exit 1; }}; "
)


def shell_join(args: Sequence[str], *, leading_space: bool = False) -> str:
    """The one place where an argument list becomes shell text (each argument quoted as needed).
    With `leading_space`, optional arguments that a rule's shell line appends directly after
    another value (`--out {params.out}{params.init}`): empty when there are none."""
    text = shlex.join(args)
    return f" {text}" if leading_space and text else text


class RuleJobs:
    """Resources, threads and launch commands of the workflow's rules, from a validated config."""

    def __init__(self, config: Mapping):
        self.config = config
        self.procs = config["num_procs"]
        self.threads_per_proc = max(1, config["threads"])
        self.gpus = self.procs if config["device"] == "cuda" else 0

    def rule_procs(self, rule: str) -> int:
        """Processes per node that torchrun starts for `rule` (one for rules that are not distributed)."""
        return config_rule_procs(self.config, rule) if DISTRIBUTED[rule] else 1

    def default_resources(self, rule: str) -> dict:
        """The built-in runtime and memory of a rule's jobs (GPU memory per process)."""
        runtime, mem_mb, per_proc = (GPU_RESOURCES if self.gpus else CPU_RESOURCES)[rule]
        return {"runtime": runtime, "mem_mb": mem_mb * self.procs if per_proc else mem_mb}

    def configured_resources(self, rule: str) -> dict:
        """Defaults, then config `resources.default`, then `resources.<rule>` (per node)."""
        res = self.default_resources(rule)
        if DISTRIBUTED[rule]:
            procs = self.rule_procs(rule)
            res.update(cpus_per_task=procs * self.threads_per_proc, gpu=procs if self.gpus else 0)
        else:
            res.update(cpus_per_task=1, gpu=0)
        overrides = self.config.get("resources") or {}
        res.update(overrides.get("default") or {})
        res.update(overrides.get(rule) or {})
        res.pop("procs", None)  # ours (the launcher's), not a scheduler resource
        return res

    def resources(self, rule: str) -> dict:
        """Resources as the SLURM plugin reads them (several nodes: GPUs per node)."""
        res = self.configured_resources(rule)
        # The node count is the config's `nodes` (the stages size their process groups and batch
        # checks from it), never a per-rule resource.
        res["nodes"] = self.config["nodes"] if rule in MULTI_NODE else 1
        if res["nodes"] > 1:
            # One task per node, each running torchrun; GPUs requested per node instead of in
            # total (the plugin's `gpu` would ask for --gpus=N and --ntasks-per-gpu).
            gpus_per_node = res.pop("gpu", 0)
            res["gpu"] = 0
            res.setdefault("mpi", "srun")
            res.setdefault("tasks", res["nodes"])
            extra = ["--ntasks-per-node=1"] + ([f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else [])
            res["slurm_extra"] = _append_words(res.get("slurm_extra", ""), extra)
        lead = self.config["slurm"]["signal_seconds"]
        if DISTRIBUTED[rule] and lead and "--signal" not in res.get("slurm_extra", ""):
            # The early warning goes to every process of the job's steps (not `B:`, the batch
            # shell only, which the plugin's job script does not pass on), as SIGTERM: the jobstep
            # Snakemake waits for its running job on SIGTERM but dies of SIGUSR1. The stage
            # checkpoints, exits 75, and Snakemake's retries resubmit the job, which resumes.
            res["slurm_extra"] = _append_words(res.get("slurm_extra", ""), [f"--signal=TERM@{lead}"])
        return res

    def threads(self, rule: str) -> int:
        """Snakemake's `threads` of a rule's jobs: the CPUs its job is given."""
        return self.resources(rule)["cpus_per_task"]

    def stage_threads_args(self, rule: str) -> list[str]:
        """`--set threads=N` when the config sets `resources.<rule>.cpus_per_task`, so that the
        job's processes use the CPUs the job was given (cpus_per_task / its processes each) instead
        of the config's `threads`. The embedded default trains its teacher alone as two one-thread
        processes (`procs: 2`: on these small networks 1.4x the images/s of one process with two
        threads) and runs the rest as one-thread jobs side by side (independent branches of the
        DAG on a 2-core CPU). (A stage takes its process count from torchrun, not the config.)"""
        own = (self.config.get("resources") or {}).get(rule) or {}
        if "cpus_per_task" not in own:
            return []
        return ["--set", f"threads={max(1, own['cpus_per_task'] // self.rule_procs(rule))}"]

    def launch_args(self, rule: str) -> list[str]:
        """The command that starts a stage's processes, as arguments.

        Rules append `-m -- stages.X ARGS`: the `--` ends torchrun's own options, which it
        otherwise matches by prefix (`--run` is "ambiguous: --run-path, --run_path").
        One node: `torchrun --standalone`. Several nodes (a SLURM allocation of `nodes` nodes with
        one task each): srun starts `sida.run.launch` once per node, which runs torchrun with a
        c10d rendezvous hosted by the first node, the address and interface that reach the other
        nodes, and a port from the job id (see its docstring). srun is given the CPUs (Slurm >=
        22.05 no longer passes the job's --cpus-per-task to steps) and GPUs per node again, and
        ends the other nodes' processes as soon as one fails instead of leaving them waiting in a
        collective. torchrun itself is started as `python -m sida.run.torchrun` (the same
        options), so a failed stage's log ends with the stage's one-line error, not torchrun's
        traceback.
        """
        procs = str(self.rule_procs(rule))
        res = self.resources(rule)
        if not DISTRIBUTED[rule] or res["nodes"] == 1:
            return [*TORCHRUN, "--standalone", "--nproc-per-node", procs]
        gpus_per_node = self.configured_resources(rule).get("gpu", 0)
        return [
            "srun", "--nodes", str(res["nodes"]), "--ntasks-per-node", "1",
            "--cpus-per-task", str(res["cpus_per_task"]),
            *(["--gpus-per-node", str(gpus_per_node)] if gpus_per_node else []),
            "--kill-on-bad-exit=1", "python", "-m", "sida.run.launch", "--nproc-per-node", procs,
        ]

    def launcher(self, rule: str) -> str:
        """`launch_args` as the shell text a rule starts its command with; a distributed rule's
        shell first ignores SIGTERM (KEEP_SHELL) so that the stage can checkpoint under SLURM."""
        return (KEEP_SHELL if DISTRIBUTED[rule] else "") + shell_join(self.launch_args(rule))


def _append_words(text: str, words: Sequence[str]) -> str:
    """`text` (sbatch's slurm_extra) with `words` appended, separated by single spaces."""
    return " ".join([str(text), *words]).strip()


# ---- Snakemake inside a SLURM job ----------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def in_slurm_job_step(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this Snakemake runs inside a SLURM job in remote mode (the plugin's job-step
    Snakemake, or the one srun starts for the rule): `--mode remote` with SLURM_JOB_ID set."""
    argv = list(argv) + [""]
    return "SLURM_JOB_ID" in environ and "--mode" in argv and argv[argv.index("--mode") + 1] == "remote"


def ignore_stop_signals() -> None:
    """Make this process (and, by inheritance, the job's shell) ignore SIGTERM, SIGUSR1 and SIGINT,
    also against Snakemake's own SIGTERM handler, which it sets later.

    SLURM signals every process of the job's steps, and the stage's launcher handles them
    (checkpoint, exit 75). Otherwise SIGUSR1 and SIGINT kill Snakemake, which ends the step and the
    stage with it, and SIGTERM makes it report the job failed even when the stage then finishes
    (its outputs would be deleted)."""
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        set_handler = signal.signal
        signal.signal = lambda sig, handler: signal.getsignal(sig) if sig in STOP_SIGNALS else set_handler(sig, handler)
    except ValueError:  # not the main thread
        pass


# ---- profiles: `--profile slurm` / `--profile local` -----------------------------------------
# Snakemake resolves a profile name as a relative path first, then under the user's and the
# system's configuration directories ($XDG_CONFIG_HOME/snakemake, /etc/xdg/snakemake). From the
# repository root `slurm` and `local` are therefore ours (links to workflow/profiles/): nothing
# is installed into the user's directories. A profile of the user's with the same name is never
# touched, but from here it is not the one used: the workflow says so once, and how to add it.
def profile_names(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The values of `--profile` (or $SNAKEMAKE_PROFILE, which Snakemake reads without one)."""
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--profile=")]
    names += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--profile"]
    if not names and environ.get("SNAKEMAKE_PROFILE"):
        names.append(environ["SNAKEMAKE_PROFILE"])
    return names


def shadowed_profile_notes(argv: Sequence[str], environ: Mapping[str, str], launch_dir: str,
                           config_dirs: Sequence[str], profiles_dir: str) -> list[str]:
    """One line per profile named like one of ours (in `profiles_dir`) whose name resolved to ours
    in `launch_dir` while the user (or the system) has a profile of that name in `config_dirs`."""
    notes = []
    for name in profile_names(argv, environ):
        ours = os.path.join(profiles_dir, name)
        if os.sep in name or not os.path.isdir(ours):
            continue
        if os.path.realpath(os.path.join(launch_dir, name)) != os.path.realpath(ours):
            continue
        for d in config_dirs:
            theirs = os.path.join(d, name)
            if os.path.exists(theirs):
                notes.append(
                    f"note: --profile {name} is this repository's ({name} -> workflow/profiles/{name}), "
                    f"not yours in {theirs} (left as it is); to use yours on top of ours: "
                    f"--profile {name} --profile {theirs}"
                )
                break
    return notes


def snakemake_config_dirs() -> list[str]:
    """The user's and the system's Snakemake configuration directories, where Snakemake looks for
    profiles (its own `get_appdirs`, so that the note names the folders it would have used)."""
    from snakemake.common import get_appdirs  # late: only the workflow has Snakemake

    dirs = get_appdirs()
    return [dirs.user_config_dir, dirs.site_config_dir]
