"""The Snakemake workflow: the DAG derived from the config, validation, lint, profiles (fast), and
the whole embedded DAG on config/ci-short.yaml with reruns and a failing stage (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, Snakemake
from sida.run.config import evaluation_entries, load_config
from sida.run.configfile import read_config

PRESETS = sorted(p for p in (REPO / "config").glob("*.yaml"))
CI = REPO / "config" / "ci-short.yaml"


def _job_stats(stdout: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    stats, in_table = {}, False
    for line in stdout.splitlines():
        if line.startswith("Job stats:"):
            in_table, stats = True, {}
            continue
        if in_table:
            m = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
            if m and m.group(1) != "total":
                stats[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                in_table = False
    return stats


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _write_config(path: Path, base: Path, edit) -> Path:
    cfg = read_config(base)
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------- fast --

def test_lint_is_clean(snakemake):
    r = snakemake("--lint", profile="")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_dry_run_of_every_preset_follows_its_runs(snakemake, preset):
    r = snakemake("-n", configfile=preset)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = read_config(preset)  # its `extends` resolved
    runs = cfg["distill"]["runs"]
    stats = _job_stats(r.stdout)
    seeds = len(cfg.get("seeds") or [None])  # training seeds: every run once per seed
    expected = {name: seeds for name in runs}
    evaluated = len(evaluation_entries(load_config(preset)))  # a run per entry of its eval_steps
    expected.update(evaluate=1 + evaluated * seeds, report=1, all=1)
    expected["fetch" if cfg.get("teacher", {}).get("source") in ("fetch", "diffusers") else "teacher"] = 1
    exports = (cfg.get("export") or {}).get("runs") or []
    if exports:  # export.runs: one export job each
        expected["export"] = len(exports)
    assert stats == expected
    # A dry run downloads nothing and writes no results.
    assert not (snakemake.workdir / "results").exists()


def test_default_config_when_no_configfile_and_presets_are_not_merged(snakemake):
    r = snakemake("-n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(_job_stats(r.stdout)) >= {"teacher", "warmup", "sid", "sida", "sid2a"}
    cifar = REPO / "config" / "cifar10-cond.yaml"
    if cifar.is_file():
        runs = set(read_config(cifar)["distill"]["runs"])
        r = snakemake("-n", configfile=cifar)
        rules = set(_job_stats(r.stdout)) - {"fetch", "teacher", "evaluate", "report", "all"}
        assert rules == runs  # the default's runs are not deep-merged into the preset's


def test_distill_inputs_follow_init_and_init_generator(snakemake, tmp_path):
    def edit(cfg):
        cfg["distill"]["runs"]["more"] = {"init": "sida", "init_generator": "sid", "discriminator": True,
                                          "phases": [{"kind": "sida", "kimg": 0.1}], "evaluate": False}
    cfg = _write_config(tmp_path / "more.yaml", CI, edit)
    r = snakemake("-n", "-p", configfile=cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = _job_stats(r.stdout)
    assert stats["more"] == 1 and stats["evaluate"] == 4  # teacher, sid, sida, sid2a; not `more`
    cmd = next(line for line in r.stdout.splitlines() if "--run more" in line)
    assert "--init results/ci-short/sida/state.pt --init-generator results/ci-short/sid/network.pt" in cmd
    assert cmd.startswith("Shell command: trap '' TERM; python -m sida.run.torchrun --standalone --nproc-per-node 1 -m -- stages.distill")
    assert "--teacher results/ci-short/teacher/network.pt" in cmd
    assert "> results/ci-short/logs/distill/more.log 2>&1 || stage_failed more" in cmd


def test_embedded_default_runs_branches_side_by_side_with_one_thread_each(snakemake, tmp_path):
    """The default gives every job one thread (two jobs at a time on 2 cores) except the teacher,
    which runs alone and gets both: its job asks Snakemake for 2 and runs as 2 one-thread processes."""
    r = snakemake("-n", "-p", "--cores", "2", configfile=REPO / "config" / "config.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", r.stdout, re.M)}
    assert "threads: 2" in blocks["teacher"] and "cpus_per_task=2," in blocks["teacher"]
    for rule in ("warmup", "sid", "sida", "sid2a", "evaluate"):
        assert "threads:" not in blocks[rule] and "cpus_per_task=1," in blocks[rule], rule  # one thread
    # Runs that others start from go first when CPUs are short: warmup (3 runs need it), then sid
    # (sid2a's generator); sida and sid2a wait for nothing of theirs and keep the default 0.
    assert "priority: 3" in blocks["warmup"] and "priority: 1" in blocks["sid"]
    assert "priority" not in blocks["sida"] and "priority" not in blocks["sid2a"]
    cmds = [line for line in r.stdout.splitlines() if line.startswith("Shell command:")]
    teacher = next(c for c in cmds if "stages.teacher" in c)
    assert teacher.startswith("Shell command: trap '' TERM; python -m sida.run.torchrun --standalone --nproc-per-node 2 -m")
    assert "--config results/digits/config.yaml --set threads=1 --out" in teacher
    others = [c for c in cmds if "stages.distill" in c or "stages.evaluate" in c]
    assert others and all("--nproc-per-node 1 " in c for c in others)  # the rest: num_procs
    # Jobs without a `resources.<rule>.cpus_per_task` of their own keep the config's `threads`.
    assert not [c for c in cmds if "stages.teacher" not in c and "--set threads=" in c]
    # A preset without per-rule CPUs has no override at all.
    r = snakemake("-n", "-p", configfile=CI)
    assert r.returncode == 0 and "--set threads=" not in r.stdout


def _fake_outputs(snakemake, configfile) -> None:
    """Create every output of the DAG as an empty file (mtimes in DAG order), so that dry runs
    show what a rerun would do without running anything."""
    r = snakemake("-n", configfile=configfile)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = [(m.group(1), re.search(r"^    output: (.+)$", m.group(2), re.M).group(1))
            for m in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", r.stdout, re.M) if "output:" in m.group(2)]
    order = ["teacher", "warmup", "sid", "sida", "sid2a", "evaluate", "report"]
    assert {rule for rule, _ in jobs} == set(order)
    t = time.time() - 1000
    for rule in order:
        t += 10
        for _, outputs in (j for j in jobs if j[0] == rule):
            for f in map(snakemake.workdir.joinpath, outputs.split(", ")):
                if rule == "report":
                    f.mkdir(parents=True, exist_ok=True)
                else:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.touch()
                os.utime(f, (t, t))


def test_training_seeds_fan_out_and_rerun_one_seed_alone(snakemake, tmp_path):
    seeded = _write_config(tmp_path / "seeded.yaml", CI, lambda c: c.update(seeds=[0, 1, 2]))
    r = snakemake("-n", "-p", configfile=seeded)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _job_stats(r.stdout) == {"teacher": 1, "warmup": 3, "sid": 3, "sida": 3, "sid2a": 3, "evaluate": 10,
                                    "report": 1, "all": 1}
    cmd = next(line for line in r.stdout.splitlines() if "--run sid2a" in line and "seed2/" in line)
    assert ("--out results/ci-short/seed2/sid2a --init results/ci-short/seed2/sid/state.pt "
            "--init-generator results/ci-short/seed2/sid/network.pt --set seed=2 ") in cmd
    assert "--teacher results/ci-short/teacher/network.pt" in cmd  # one teacher for every seed
    cmd = next(line for line in r.stdout.splitlines() if "stages.evaluate" in line and "seed1/sida" in line)
    assert "--network results/ci-short/seed1/sida/network.pt --kind generator --name sida --train-seed 1" in cmd
    assert "--out results/ci-short/evaluate/seed1/sida/metrics.json" in cmd

    _fake_outputs(snakemake, seeded)
    r = snakemake("-n", configfile=seeded)
    assert "Nothing to be done" in r.stdout + r.stderr
    # One seed's run: that run, its evaluation and the report; no other seed, no other run.
    r = snakemake("-n", "--forcerun", "results/ci-short/seed1/sida/network.pt", configfile=seeded)
    assert _job_stats(r.stdout) == {"sida": 1, "evaluate": 1, "report": 1, "all": 1}
    outputs = " ".join(re.findall(r"^    output: (.+)$", r.stdout, re.M))
    assert "results/ci-short/seed1/sida/network.pt" in outputs and "seed0/" not in outputs
    # One seed's SiD: SiD2A of that seed starts from it, so it reruns too.
    r = snakemake("-n", "--forcerun", "results/ci-short/seed2/sid/network.pt", configfile=seeded)
    assert _job_stats(r.stdout) == {"sid": 1, "sid2a": 1, "evaluate": 2, "report": 1, "all": 1}
    outputs = " ".join(re.findall(r"^    output: (.+)$", r.stdout, re.M))
    assert "seed2/sid2a/network.pt" in outputs and "seed0/" not in outputs and "seed1/" not in outputs
    # A rule: every seed of that run.
    r = snakemake("-n", "--forcerun", "sida", configfile=seeded)
    assert _job_stats(r.stdout) == {"sida": 3, "evaluate": 3, "report": 1, "all": 1}


def test_few_step_evaluations_fan_out_with_training_seeds(snakemake, tmp_path):
    """ADD's 4-step evaluation is its own model per training seed, from that seed's network."""
    seeded = _write_config(tmp_path / "seeded.yaml", REPO / "config" / "digits-baselines.yaml",
                           lambda c: c.update(seeds=[0, 1]))
    r = snakemake("-n", "-p", configfile=seeded)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _job_stats(r.stdout)["evaluate"] == 1 + 6 * 2  # teacher, then SiD, SiDA, SiD2A, DMD2, ADD x {1, 4}
    cmd = next(line for line in r.stdout.splitlines() if "stages.evaluate" in line and "seed1/add-4steps" in line)
    assert ("--network results/digits-baselines/seed1/add/network.pt --kind generator --name add-4steps "
            "--train-seed 1 --steps 4 --label 'ADD (4 steps)' "
            "--out results/digits-baselines/evaluate/seed1/add-4steps/metrics.json") in cmd


@pytest.mark.parametrize("case,args,message", [
    ("range", ["--config", "num_procs=0"], r"num_procs: 0 is less than the minimum of 1"),
    ("pattern", ["--config", "experiment=a/b"], r"experiment: 'a/b' does not match"),
    ("unknown run", None, r"distill\.runs\.sid\.init: unknown run 'nope'"),
    ("reserved name", None, r"distill\.runs\.report: the name 'report' is taken"),
    ("seed folder name", None, r"distill\.runs\.seed3: the name 'seed3' is taken"),
    ("balanced labels", None, r"evaluate\.num_samples: 205 is not a multiple of data\.label_dim 10"),
    ("batch", ["--config", "num_procs=3"], r"batch: 64 is not divisible by 3 processes"),
])
def test_bad_config_fails_fast_with_one_line(snakemake, tmp_path, case, args, message):
    configfile = CI
    if case == "unknown run":
        configfile = _write_config(tmp_path / "c.yaml", CI,
                                   lambda c: c["distill"]["runs"]["sid"].update(init="nope"))
    if case == "balanced labels":
        configfile = _write_config(tmp_path / "c.yaml", CI, lambda c: c["evaluate"].update(num_samples=205))
    if case in ("reserved name", "seed folder name"):
        name = "report" if case == "reserved name" else "seed3"
        configfile = _write_config(tmp_path / "c.yaml", CI, lambda c: c["distill"]["runs"].update(
            {name: {"phases": [{"kind": "sid", "kimg": 1}]}}))
    # CPU time, not wall time: other tests may share the cores (wall time is only bounded loosely).
    cpu0, start = _children_cpu(), time.monotonic()
    r = snakemake("-n", *(args or []), configfile=configfile)
    cpu, wall = _children_cpu() - cpu0, time.monotonic() - start
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert cpu < 5 and wall < 60, f"took {cpu:.1f} s CPU, {wall:.1f} s wall"


def test_multi_node_runs_torchrun_under_srun_with_c10d(snakemake, tmp_path):
    cfg = _write_config(tmp_path / "mn.yaml", CI, lambda c: c.update(nodes=2, num_procs=2, device="cuda"))
    r = snakemake("-n", "-p", "--until", "warmup", configfile=cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout
    teacher = next(line for line in text.splitlines() if "stages.teacher" in line)
    # one task per node with the job's CPUs and GPUs per node; sida.run.launch picks the c10d
    # rendezvous (tests/test_launch.py; run for real in tests/test_slurm_multinode.py)
    assert ("srun --nodes 2 --ntasks-per-node 1 --cpus-per-task 2 --gpus-per-node 2 --kill-on-bad-exit=1 "
            "python -m sida.run.launch --nproc-per-node 2 -m -- stages.teacher") in teacher
    res = [line for line in text.splitlines() if line.strip().startswith("resources:")]
    assert any("nodes=2" in line and "mpi=srun" in line and "tasks=2" in line
               and "--gpus-per-node=2" in line for line in res), res


SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


@pytest.mark.skipif("resources" not in SCHEMA["properties"],
                    reason="the config schema has no `resources` section yet")
def test_resources_come_from_config(snakemake, tmp_path):
    cfg = _write_config(tmp_path / "res.yaml", CI, lambda c: c.update(resources={
        "default": {"slurm_partition": "gpu"}, "distill": {"runtime": 2880, "mem_mb": 64000}}))
    r = snakemake("-n", "--until", "warmup", configfile=cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    res = {m.group(1): m.group(2) for m in re.finditer(r"(?ms)^rule (\w+):.*?^\s+resources: ([^\n]+)", r.stdout)}
    assert "runtime=2880" in res["warmup"] and "mem_mb=64000" in res["warmup"]
    assert "slurm_partition=gpu" in res["teacher"] and "runtime=60" in res["teacher"]


def test_slurm_profile_dry_run(snakemake):
    r = snakemake("-n", profile="slurm", configfile=CI)
    assert r.returncode == 0, r.stderr[-2000:]
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-keep-successful-logs"] is True


# ------------------------------------------------------------------------------------- slow --

def _snapshot(root: Path, *dirs: str) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under the given result folders."""
    out = {}
    for d in dirs:
        for p in sorted((root / d).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """The whole DAG of config/ci-short.yaml, run once with the local profile."""
    sm = Snakemake(tmp_path_factory.mktemp("ci"))
    start = time.monotonic()
    r = sm(configfile=CI, timeout=400)
    print(f"ci-short DAG, local profile: {time.monotonic() - start:.0f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return sm, r


@pytest.mark.slow
def test_full_dag_writes_every_output(ci_run):
    sm, r = ci_run
    exp = sm.workdir / "results" / "ci-short"
    for f in ["teacher/network.pt", "teacher/samples.png", "teacher/metrics.jsonl", "config.yaml",
              "report/report.md", "report/report.html", "report/results.json", "logs/teacher.log",
              "logs/report.log"]:
        assert (exp / f).is_file(), f
    for run in ["warmup", "sid", "sida", "sid2a"]:
        for f in ["network.pt", "state.pt", "samples.png", "metrics.jsonl"]:
            assert (exp / run / f).is_file(), f"{run}/{f}"
        assert not (exp / run / "work").exists(), "a finished stage leaves no resume state"
        assert (exp / "logs" / "distill" / f"{run}.log").is_file()
    for name in ["teacher", "sid", "sida", "sid2a"]:
        assert json.loads((exp / "evaluate" / name / "metrics.json").read_text())
        assert (exp / "evaluate" / name / "samples.png").is_file()
    assert not (exp / "evaluate" / "warmup").exists()  # evaluate: false
    assert "Report: results/ci-short/report/report.html" in r.stdout + r.stderr
    # The stages read the config Snakemake validated, with its defaults filled in.
    resolved = yaml.safe_load((exp / "config.yaml").read_text())
    assert resolved["experiment"] == "ci-short" and resolved["distill"]["runs"]["sid"]["evaluate"] is True


@pytest.mark.slow
def test_second_run_does_nothing(ci_run):
    sm, _ = ci_run
    r = sm(configfile=CI, timeout=60)
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr


@pytest.mark.slow
def test_snakemake_report_has_grids_and_results(ci_run, tmp_path):
    sm, _ = ci_run
    out = tmp_path / "report.zip"
    r = sm("--report", str(out), configfile=CI, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    import zipfile
    names = [Path(n).name for n in zipfile.ZipFile(out).namelist()]
    assert "report.html" in names and names.count("samples.png") >= 4 + 4 + 1


@pytest.mark.slow
def test_forcerun_sida_reruns_only_sida_and_downstream(ci_run):
    sm, _ = ci_run
    root = sm.workdir / "results" / "ci-short"
    kept = ["teacher", "warmup", "sid", "sid2a", "evaluate/teacher", "evaluate/sid", "evaluate/sid2a"]
    before = _snapshot(root, *kept)
    sida_before = _snapshot(root, "sida", "evaluate/sida", "report")
    start = time.monotonic()
    r = sm("--forcerun", "sida", configfile=CI, timeout=300)
    print(f"--forcerun sida: {time.monotonic() - start:.0f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    ran = set(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", r.stdout + r.stderr))
    assert ran == {"sida", "evaluate", "report", "all"}
    assert _snapshot(root, *kept) == before  # same bytes, same mtimes
    after = _snapshot(root, "sida", "evaluate/sida", "report")
    for f in ["sida/network.pt", "sida/state.pt", "evaluate/sida/metrics.json", "report/report.md"]:
        assert after[f][1] > sida_before[f][1], f"{f} was not rewritten"


@pytest.mark.slow
def test_failing_stage_stops_with_its_error_then_a_rerun_continues(ci_run):
    sm, _ = ci_run
    root = sm.workdir / "results" / "ci-short"
    teacher = root / "teacher" / "network.pt"
    good = teacher.read_bytes()
    teacher_log_mtime = (root / "logs" / "teacher.log").stat().st_mtime_ns
    teacher.write_bytes(good[: len(good) // 3])  # a truncated (corrupt) teacher

    r = sm(configfile=CI, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert re.search(r"Error in rule (warmup|evaluate)", out), out[-3000:]
    # The stage's one-line error, with the rule and the log path.
    lines = [line for line in r.stderr.splitlines() if re.match(r"\[(warmup|evaluate:teacher)\] error: ", line)]
    assert lines, r.stderr[-3000:]
    assert re.search(r"\(log: results/ci-short/logs/(distill/warmup|evaluate/teacher)\.log\)$", lines[0])
    assert "Traceback" not in lines[0]
    assert (root / "teacher" / "metrics.jsonl").is_file()  # earlier outputs stay

    teacher.write_bytes(good)  # fix the input; the rerun continues from there
    r = sm(configfile=CI, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    ran = set(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", r.stdout + r.stderr))
    assert "teacher" not in ran and {"warmup", "sid", "sida", "sid2a", "report"} <= ran
    assert (root / "logs" / "teacher.log").stat().st_mtime_ns == teacher_log_mtime
    assert (root / "report" / "report.md").is_file()
