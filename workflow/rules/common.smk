# Shared by all rules: paths, the DAG derived from `distill.runs`, resources, the launcher.
# `config` is validated (defaults filled) by the Snakefile before this file is read.

import json
import os
import re
import shlex
import signal
import sys

import yaml

from sida.run.config import evaluation_entries, run_config, rule_procs as sida_rule_procs


RESULTS = config["results_dir"]
EXP = f"{RESULTS}/{config['experiment']}"
LOGS = f"{EXP}/logs"
# The resolved config (defaults filled, --config overrides applied) that every stage reads:
# stages see exactly what Snakemake validated. Written by `onstart` (not during dry runs).
CONFIG_RESOLVED = f"{EXP}/config.yaml"
IMAGE = config["container"].get("image", "containers/sida.sif")

RUNS = config["distill"]["runs"]
# Generator evaluations: one per run with `evaluate: true` and entry of its `eval_steps`, named
# `<run>` (one step) or `<run>-<k>steps` (ADD's few-step sampling), each with its report label.
EVAL_ENTRIES = evaluation_entries(config)
EVALUATED = list(EVAL_ENTRIES)
# Training seeds: with a `seeds` list every distillation run is trained once per seed, under
# <exp>/seed<K>/<run>/ (a `seed` wildcard), so rerunning one seed's run touches no other seed.
SEEDS = config["seeds"]

# Inside a SLURM job (Snakemake in remote mode: the plugin's job-step Snakemake and the one srun
# starts for the rule), Snakemake and, by inheritance, the job's shell ignore SIGTERM, SIGUSR1 and
# SIGINT: SLURM signals every process of the job's steps, and the stage's launcher handles them
# (checkpoint, exit 75). Otherwise SIGUSR1 and SIGINT kill Snakemake, which ends the step and the
# stage with it, and SIGTERM makes it report the job failed even when the stage then finishes
# (its outputs would be deleted). Snakemake sets its own SIGTERM handler later: that is skipped.
_argv = sys.argv + [""]
if "SLURM_JOB_ID" in os.environ and "--mode" in sys.argv and _argv[_argv.index("--mode") + 1] == "remote":
    _STOP = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    try:
        for _sig in _STOP:
            signal.signal(_sig, signal.SIG_IGN)
        _set_handler = signal.signal
        signal.signal = lambda sig, handler: signal.getsignal(sig) if sig in _STOP else _set_handler(sig, handler)
    except ValueError:  # not the main thread
        pass


def run_dir(run, seed="{seed}"):
    """A run's output folder: <exp>/<run>, or <exp>/seed<seed>/<run> with training seeds (by
    default the `{seed}` wildcard, so the same path serves as an output pattern and an input)."""
    return f"{EXP}/{run}" if SEEDS is None else f"{EXP}/seed{seed}/{run}"


def run_instances(run):
    """The folders of every trained copy of a run: one per training seed."""
    return [run_dir(run)] if SEEDS is None else [run_dir(run, s) for s in SEEDS]


def _one_of(names):
    """A wildcard regex matching exactly these names (never matches when there are none)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


# Evaluated models: `teacher` and each evaluation entry, or `seed<K>/<entry>` per training seed
# (an entry's name in the folder layout of its run).
EVALUATED_MODELS = [os.path.relpath(d, EXP) for entry in EVALUATED for d in run_instances(entry)]


wildcard_constraints:
    name=_one_of(["teacher", *EVALUATED_MODELS]),
    seed=_one_of([str(s) for s in SEEDS or []]),


# ---- external assets (fetch) and the teacher: trained here or fetched -----------------------
FETCH_DIR = f"{EXP}/fetch"
FETCH_ASSETS = [a for a in (config["fetch"].get("assets") or []) if isinstance(a, dict)]
FETCH_KINDS = {a.get("kind") for a in FETCH_ASSETS}
# What the fetch stage writes: converted networks, reference statistics, the manifest (last).
FETCH_OUTPUTS = {"manifest": f"{FETCH_DIR}/manifest.json"}
for _asset in FETCH_ASSETS:
    if _asset.get("kind") == "teacher":
        FETCH_OUTPUTS["teacher"] = f"{FETCH_DIR}/teacher.pt"
    elif _asset.get("kind") == "refstats":
        FETCH_OUTPUTS["refstats"] = f"{FETCH_DIR}/refstats.npz"
    elif _asset.get("kind") == "sid_generator":
        FETCH_OUTPUTS[f"generator_{_asset.get('name')}"] = f"{FETCH_DIR}/{_asset.get('name')}.pt"

# teacher.source diffusers: the fetch stage imports teacher.path / teacher.url as teacher.pt.
DIFFUSERS_TEACHER = config["teacher"]["source"] == "diffusers"
if DIFFUSERS_TEACHER:
    FETCH_OUTPUTS["teacher"] = f"{FETCH_DIR}/teacher.pt"
# What the fetch job's outputs depend on (its rerun trigger): the teacher's folder for diffusers.
FETCH_SETTINGS = {"diffusers_teacher": {k: config["teacher"][k] for k in ("path", "url")}} if DIFFUSERS_TEACHER else {}

if config["teacher"]["source"] == "train":
    TEACHER_PT = f"{EXP}/teacher/network.pt"
elif DIFFUSERS_TEACHER:
    TEACHER_PT = FETCH_OUTPUTS["teacher"]
else:
    if "teacher" not in FETCH_KINDS:
        sys.exit(
            "error: teacher.source: 'fetch' needs an asset of kind 'teacher' in fetch.assets "
            "(or set teacher.source: train)"
        )
    TEACHER_PT = FETCH_OUTPUTS["teacher"]
# Evaluation may read fetched assets (reference statistics, Inception weights, the dataset).
FETCH_DEPS = {"fetched": FETCH_OUTPUTS["manifest"]} if FETCH_ASSETS else {}


# ---- distillation runs: inputs derived from `init` / `init_generator` -----------------------
def distill_inputs(run):
    """Teacher network, plus the final state of the `init` run and the generator of the
    `init_generator` run when the run starts from another one (of the same training seed)."""
    spec = RUNS[run]
    inputs = {"teacher": TEACHER_PT}
    if spec["init"] != "teacher":
        inputs["init"] = f"{run_dir(spec['init'])}/state.pt"
    if spec["init_generator"] is not None:
        inputs["init_generator"] = f"{run_dir(spec['init_generator'])}/network.pt"
    features = run_config(config, run)["add_features"]
    if spec.get("discriminator") == "add" and features["kind"] == "dinov2" and features["weights"] is None:
        inputs.update(FETCH_DEPS)  # ADD's DINOv2 weights: fetch/dinov2_<arch>.pth
    return inputs


def run_priority(run):
    """How many runs start, directly or not, from `run` (its `init` or `init_generator` chain).
    It is the Snakemake priority of the run's job. When CPUs are short, runs that others wait
    for go first (the embedded default's warmup, then sid, which sid2a needs), so the longest
    path of the DAG does not wait behind a run or an evaluation that nothing depends on."""

    def sources(name):
        spec = RUNS[name]
        return {s for s in (spec["init"], spec["init_generator"]) if s in RUNS}

    def depends_on(name, seen=()):
        direct = sources(name)
        return direct | {a for s in direct if s not in seen for a in depends_on(s, (*seen, s))}

    return sum(1 for other in RUNS if other != run and run in depends_on(other))


def distill_init_args(wildcards, input):
    """The stage's --init / --init-generator flags (with a leading space), from the job's inputs,
    and its training seed (--set seed=K) when the config lists `seeds`."""
    inputs = dict(input.items())
    args = ""
    if "init" in inputs:
        args += f" --init {inputs['init']}"
    if "init_generator" in inputs:
        args += f" --init-generator {inputs['init_generator']}"
    if SEEDS is not None:
        args += f" --set seed={wildcards.seed}"
    return args


def job_label(run):
    """How errors name a distillation job: the run, prefixed by its training seed folder."""
    if SEEDS is None:
        return run
    return lambda wildcards: f"seed{wildcards.seed}/{run}"


# ---- evaluations and the report ----------------------------------------------------------
EVALUATIONS = [f"{EXP}/evaluate/{name}/metrics.json" for name in ["teacher", *EVALUATED_MODELS]]
EVALUATION_GRIDS = [f"{EXP}/evaluate/{name}/samples.png" for name in ["teacher", *EVALUATED_MODELS]]
TRAINING_METRICS = [f"{d}/metrics.jsonl" for run in RUNS for d in run_instances(run)]
REPORT_DIR = f"{EXP}/report"
REPORT_MD = f"{REPORT_DIR}/report.md"
REPORT_HTML = f"{REPORT_DIR}/report.html"


# ---- exported generators (export.runs) -----------------------------------------------------
EXPORTS = [f"{EXP}/export/{run}" for run in config["export"]["runs"]]


def export_network(wildcards):
    """The network file an export job reads: the run's final EMA generator (first training seed)."""
    return f"{run_instances(wildcards.run)[0]}/network.pt"


# ---- what each job's result depends on (Snakemake's `params` rerun trigger) ----------------
def settings(*sections, **extra):
    """A canonical JSON string of config sections: when it changes, the job reruns."""
    picked = {s: config[s] for s in sections}
    picked.update(extra)
    return json.dumps(picked, sort_keys=True, default=str)


def _evaluated_model(wildcards):
    """(evaluation entry, training seed or None) of a model name `<entry>` or `seed<K>/<entry>`."""
    seed, _, entry = wildcards.name.rpartition("/")
    return entry, (seed[len("seed"):] if seed else None)


def evaluate_inputs(wildcards):
    """The network to evaluate (the teacher's or, for an evaluation entry, its run's EMA
    generator of the model's training seed) and fetched assets."""
    if wildcards.name == "teacher":
        network = TEACHER_PT
    else:
        entry, seed = _evaluated_model(wildcards)
        network = f"{run_dir(EVAL_ENTRIES[entry]['run'], seed)}/network.pt"
    return {"network": network, **FETCH_DEPS}


def evaluate_kind(wildcards):
    return "teacher" if wildcards.name == "teacher" else "generator"


def evaluate_name_args(wildcards):
    """--name ENTRY (the report groups training seeds by it), plus --train-seed K for a model
    `seed<K>/<entry>` and, for a generator, the entry's --steps and --label."""
    if wildcards.name == "teacher":
        return "--name teacher"
    entry, seed = _evaluated_model(wildcards)
    spec = EVAL_ENTRIES[entry]
    args = f"--name {entry}" + (f" --train-seed {seed}" if seed is not None else "")
    return args + f" --steps {spec['steps']} --label {shlex.quote(spec['label'])}"


def output_dir(wildcards, output):
    """The stage's --out directory: where its first declared output lies."""
    return os.path.dirname(output[0])


def distill_settings(run):
    return settings("seed", "data", "network", run=run_config(config, run))


# ---- resources and the launcher ------------------------------------------------------------
PROCS = config["num_procs"]
THREADS_PER_PROC = max(1, config["threads"])
GPUS = PROCS if config["device"] == "cuda" else 0

# Runtime (minutes) and memory (MB) per job. On CPU sized for the embedded default (digits on a
# laptop); on GPUs for a preset's long runs (per-GPU memory scaled by num_procs). Presets and
# users override them with a `resources` section (per rule name), e.g.
#   resources: {default: {slurm_partition: gpu}, distill: {runtime: 2880, mem_mb: 64000}}
if GPUS:
    DEFAULT_RESOURCES = {
        "teacher": {"runtime": 2880, "mem_mb": 16000 * PROCS},
        "fetch": {"runtime": 60, "mem_mb": 8000},
        "distill": {"runtime": 2880, "mem_mb": 16000 * PROCS},
        "evaluate": {"runtime": 240, "mem_mb": 16000 * PROCS},
        "report": {"runtime": 10, "mem_mb": 2000},
    }
else:
    DEFAULT_RESOURCES = {
        "teacher": {"runtime": 60, "mem_mb": 4000},
        "fetch": {"runtime": 30, "mem_mb": 4000},
        "distill": {"runtime": 60, "mem_mb": 4000},
        "evaluate": {"runtime": 60, "mem_mb": 4000},
        "report": {"runtime": 10, "mem_mb": 2000},
    }
# Rules that start `num_procs` processes per node with torchrun (and `nodes` nodes when
# training); the others are one process.
DISTRIBUTED = {"teacher": True, "distill": True, "evaluate": True, "fetch": False, "report": False}
MULTI_NODE = {"teacher", "distill"}


def rule_procs(rule):
    """Processes per node that torchrun starts for `rule` (one for rules that are not distributed)."""
    return sida_rule_procs(config, rule) if DISTRIBUTED[rule] else 1


def _configured_resources(rule):
    """Defaults, then config `resources.default`, then `resources.<rule>` (per node)."""
    res = dict(DEFAULT_RESOURCES[rule])
    if DISTRIBUTED[rule]:
        procs = rule_procs(rule)
        res.update(cpus_per_task=procs * THREADS_PER_PROC, gpu=procs if GPUS else 0)
    else:
        res.update(cpus_per_task=1, gpu=0)
    overrides = config.get("resources") or {}
    res.update(overrides.get("default") or {})
    res.update(overrides.get(rule) or {})
    res.pop("procs", None)  # ours (the launcher's), not a scheduler resource
    return res


def rule_resources(rule):
    """Resources as the SLURM plugin reads them (several nodes: GPUs per node)."""
    res = _configured_resources(rule)
    # The node count is the config's `nodes` (the stages size their process groups and batch
    # checks from it), never a per-rule resource.
    res["nodes"] = config["nodes"] if rule in MULTI_NODE else 1
    if res["nodes"] > 1:
        # One task per node, each running torchrun; GPUs requested per node instead of in total
        # (the plugin's `gpu` would ask for --gpus=N and --ntasks-per-gpu).
        gpus_per_node = res.pop("gpu", 0)
        res["gpu"] = 0
        res.setdefault("mpi", "srun")
        res.setdefault("tasks", res["nodes"])
        extra = "--ntasks-per-node=1" + (f" --gpus-per-node={gpus_per_node}" if gpus_per_node else "")
        res["slurm_extra"] = f"{res.get('slurm_extra', '')} {extra}".strip()
    lead = config["slurm"]["signal_seconds"]
    if DISTRIBUTED[rule] and lead and "--signal" not in res.get("slurm_extra", ""):
        # The early warning goes to every process of the job's steps (not `B:`, the batch shell
        # only, which the plugin's job script does not pass on), as SIGTERM: the jobstep Snakemake
        # waits for its running job on SIGTERM but dies of SIGUSR1. The stage checkpoints, exits
        # 75, and Snakemake's retries resubmit the job, which resumes.
        res["slurm_extra"] = f"{res.get('slurm_extra', '')} --signal=TERM@{lead}".strip()
    return res


def rule_threads(rule):
    return rule_resources(rule)["cpus_per_task"]


def stage_threads_arg(rule):
    """` --set threads=N` when the config sets `resources.<name>.cpus_per_task` for this kind of
    job, so that its processes use the CPUs the job was given (cpus_per_task / its processes
    each) instead of the config's `threads`. The embedded default trains its teacher alone as two
    one-thread processes (`procs: 2`: on these small networks 1.4x the images/s of one process
    with two threads) and runs the rest as one-thread jobs side by side (independent branches of
    the DAG on a 2-core CPU). (A stage takes its process count from torchrun, not the config.)"""
    own = (config.get("resources") or {}).get(rule) or {}
    if "cpus_per_task" not in own:
        return ""
    return f" --set threads={max(1, own['cpus_per_task'] // rule_procs(rule))}"


TORCHRUN = "python -m sida.run.torchrun"
# SLURM signals every process of a job step, the job's shell too, which would die of SIGTERM
# while its stage writes the checkpoint (and the step would end, killing the stage): the shell
# ignores it, the stage's launcher handles it (sida.run.torchrun, sida.run.signals).
KEEP_SHELL = "trap '' TERM; "


def launcher(rule):
    """The command that starts a stage's processes.

    Rules call it as `{params.launch} -m -- stages.X ARGS`: the `--` ends torchrun's own options,
    which it otherwise matches by prefix (`--run` is "ambiguous: --run-path, --run_path").
    One node: `torchrun --standalone`. Several nodes (a SLURM allocation of `nodes` nodes with one
    task each): srun starts `sida.run.launch` once per node, which runs torchrun with a c10d
    rendezvous hosted by the first node, the address and interface that reach the other nodes,
    and a port from the job id (see its docstring). srun is given the CPUs (Slurm >= 22.05 no
    longer passes the job's --cpus-per-task to steps) and GPUs per node again, and ends the
    other nodes' processes as soon as one fails instead of leaving them waiting in a collective.
    torchrun itself is started as `python -m sida.run.torchrun` (the same options), so a failed
    stage's log ends with the stage's one-line error, not torchrun's traceback.
    """
    procs = rule_procs(rule)
    if not DISTRIBUTED[rule]:
        return f"{TORCHRUN} --standalone --nproc-per-node 1"
    res = rule_resources(rule)
    if res["nodes"] == 1:
        return f"{KEEP_SHELL}{TORCHRUN} --standalone --nproc-per-node {procs}"
    gpus_per_node = _configured_resources(rule).get("gpu", 0)
    gpus = f" --gpus-per-node {gpus_per_node}" if gpus_per_node else ""
    return (
        f"{KEEP_SHELL}srun --nodes {res['nodes']} --ntasks-per-node 1 --cpus-per-task {res['cpus_per_task']}{gpus} "
        f"--kill-on-bad-exit=1 python -m sida.run.launch --nproc-per-node {procs}"
    )


# ---- profiles: `--profile slurm` / `--profile local` -----------------------------------------
# Snakemake resolves a profile name as a relative path first, then under the user's and the
# system's configuration directories ($XDG_CONFIG_HOME/snakemake, /etc/xdg/snakemake). From the
# repository root `slurm` and `local` are therefore ours (links to workflow/profiles/): nothing
# is installed into the user's directories. A profile of the user's with the same name is never
# touched, but from here it is not the one used: say so once, and how to add it.
PROFILES_DIR = os.path.join(workflow.basedir, "profiles")


def _profile_names(argv, environ):
    """The values of `--profile` (or $SNAKEMAKE_PROFILE, which Snakemake reads without one)."""
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--profile=")]
    names += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--profile"]
    if not names and environ.get("SNAKEMAKE_PROFILE"):
        names.append(environ["SNAKEMAKE_PROFILE"])
    return names


def shadowed_profile_notes(argv, environ, launch_dir, config_dirs):
    """One line per profile named like one of ours whose name resolved to ours in `launch_dir`
    while the user (or the system) has a profile of that name in `config_dirs`."""
    notes = []
    for name in _profile_names(argv, environ):
        ours = os.path.join(PROFILES_DIR, name)
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


def note_shadowed_profiles():
    """Print shadowed_profile_notes for this invocation (the shell's $PWD is where it started:
    Snakemake has already changed into --directory)."""
    from snakemake.common import get_appdirs

    dirs = get_appdirs()
    launch_dir = os.environ.get("PWD") or os.getcwd()
    for line in shadowed_profile_notes(sys.argv, os.environ, launch_dir,
                                       [dirs.user_config_dir, dirs.site_config_dir]):
        print(line, file=sys.stderr)


# Every job's shell starts with this: strict mode and `stage_failed RULE LOG`, which each rule
# calls when its stage fails (the stage's output goes to the rule's log). It repeats the stage's
# one-line error (the first `error: ...` line of the log: torchrun's own report follows it, so
# the last line is not it) with the log path, then fails the job: with status 75 when the stage
# stopped on a signal after writing its checkpoint (its last line says so), else 1.
shell.prefix(
    "set -euo pipefail; "
    "stage_failed() {{ rc=$?; echo \"[$1] $(grep -m 1 -E '^(\\[rank [0-9]+\\] )?error: ' \"$2\" "
    "|| tail -n 1 \"$2\") (log: $2)\" >&2; [ $rc = 75 ] && exit 75; exit 1; }}; "
)


def write_resolved_config():
    """Write CONFIG_RESOLVED atomically, only when its content changes (keeps its mtime)."""
    text = (
        "# Written by the workflow: the validated config (defaults filled) the stages of this\n"
        "# experiment ran with. Rerun a stage by hand with --config on this file.\n"
        + yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
    )
    try:
        with open(CONFIG_RESOLVED) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    os.makedirs(os.path.dirname(CONFIG_RESOLVED), exist_ok=True)
    tmp = f"{CONFIG_RESOLVED}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, CONFIG_RESOLVED)
