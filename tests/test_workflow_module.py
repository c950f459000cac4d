"""The workflow's logic without Snakemake: paths and the DAG (sida.run.workflow), resources, launch
commands, the jobs' shell prefix, signals and the profile note (sida.run.jobs), and the one config
check. The Snakemake dry runs of the same things are in test_workflow.py."""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers import add_defaulted_keys
from sida.errors import ConfigError
from sida.run import config as config_module
from sida.run import jobs
from sida.run.config import load_config, load_schema, run_config, validate
from sida.run.configfile import read_config
from sida.run.workflow import (RULE_SECTIONS, Plan, check_config, config_source, default_configfile, one_of,
                               resolved_config_text, settings, wildcard_names, write_resolved_config)

TRAP = "trap '' TERM; "
TORCHRUN = "python -m sida.run.torchrun --standalone --nproc-per-node"


def _preset(name: str, **overrides) -> dict:
    """A preset as loaded by the workflow (defaults filled), with top-level keys replaced."""
    cfg = read_config(REPO / "config" / f"{name}.yaml")
    cfg.update(overrides)
    return check_config(cfg, name).config


@pytest.fixture(scope="module")
def default() -> dict:
    return load_config(REPO / "config" / "config.yaml")


@pytest.fixture(scope="module")
def seeded() -> dict:
    return _preset("digits-weak-teacher")


@pytest.fixture(scope="module")
def cifar() -> dict:
    return _preset("cifar10-cond")


# ---- paths per run and training seed --------------------------------------------------------

def test_paths_of_a_config_without_training_seeds(default):
    plan = Plan(default)
    assert plan.exp == "results/digits" and plan.logs == "results/digits/logs"
    assert plan.config_resolved == "results/digits/config.yaml"
    assert plan.run_dir("sid") == "results/digits/sid" and plan.run_instances("sid") == ["results/digits/sid"]
    assert plan.run_log("sid") == "results/digits/logs/distill/sid.log"
    assert plan.evaluated_models == ["teacher", "sid", "sida", "sid2a"]  # warmup has evaluate: false
    assert plan.evaluations[0] == "results/digits/evaluate/teacher/metrics.json"
    assert plan.evaluation_grids[-1] == "results/digits/evaluate/sid2a/samples.png"
    assert plan.training_metrics == [f"results/digits/{r}/metrics.jsonl" for r in ("warmup", "sid", "sida", "sid2a")]
    assert (plan.report_dir, plan.report_html) == ("results/digits/report", "results/digits/report/report.html")
    assert plan.teacher_pt == "results/digits/teacher/network.pt"
    assert plan.fetch_deps == {} and plan.exports == [] and plan.image == "containers/sida.sif"


def test_paths_per_training_seed(seeded, default):
    plan = Plan(seeded)
    exp = "results/digits-weak-teacher"
    assert plan.run_dir("sid") == f"{exp}/seed{{seed}}/sid"  # the wildcard: an output pattern
    assert plan.run_dir("sid", 2) == f"{exp}/seed2/sid"
    assert plan.run_instances("sid") == [f"{exp}/seed{k}/sid" for k in (0, 1, 2)]
    assert plan.run_log("sida") == f"{exp}/logs/distill/seed{{seed}}/sida.log"
    assert "seed1/sid_lrfake3" in plan.evaluated_models and "sid" not in plan.evaluated_models
    assert len(plan.training_metrics) == 3 * len(plan.runs)
    assert plan.job_label("sid", "1") == "seed1/sid" and Plan(default).job_label("sid") == "sid"
    assert plan.export_network("sid") == f"{exp}/seed0/sid/network.pt"  # the first seed's


def test_wildcard_constraints_match_exactly_the_models_and_seeds(seeded, default):
    names = wildcard_names(Plan(seeded))
    assert names["seed"] == "0|1|2"
    assert "seed0/sida" in names["name"].split("|") and "teacher" in names["name"].split("|")
    assert wildcard_names(Plan(default))["seed"] == "(?!)"  # no seeds: never matches
    assert one_of(["b", "a.b"]) == "a\\.b|b" and one_of([]) == "(?!)"


# ---- the DAG: inputs, priorities, stage arguments ----------------------------------------------

def test_distill_inputs_follow_init_and_init_generator(default, seeded):
    plan = Plan(default)
    teacher = "results/digits/teacher/network.pt"
    assert plan.distill_inputs("warmup") == {"teacher": teacher}
    assert plan.distill_inputs("sid") == {"teacher": teacher, "init": "results/digits/warmup/state.pt"}
    assert plan.distill_inputs("sid2a") == {"teacher": teacher, "init_generator": "results/digits/sid/network.pt"}
    # With training seeds a run starts from the same seed's run.
    assert Plan(seeded).distill_inputs("sid")["init"] == "results/digits-weak-teacher/seed{seed}/warmup/state.pt"


def test_runs_that_others_wait_for_go_first(default):
    plan = Plan(default)
    assert {run: plan.run_priority(run) for run in plan.runs} == {"warmup": 3, "sid": 1, "sida": 0, "sid2a": 0}


def test_distill_arguments_are_a_list_joined_with_quotes(default, seeded):
    inputs = {"teacher": "t.pt", "init": "a b/state.pt", "init_generator": "g.pt"}
    args = Plan(default).distill_init_args(inputs, None)
    assert args == ["--init", "a b/state.pt", "--init-generator", "g.pt"]
    assert jobs.shell_join(args, leading_space=True) == " --init 'a b/state.pt' --init-generator g.pt"
    assert Plan(seeded).distill_init_args({"teacher": "t.pt"}, "2") == ["--set", "seed=2"]
    assert jobs.shell_join([], leading_space=True) == ""  # nothing to append


def test_evaluations_read_the_right_network_with_their_name_steps_and_label(seeded):
    plan = Plan(seeded)
    assert plan.evaluate_inputs("teacher") == {"network": "results/digits-weak-teacher/teacher/network.pt"}
    assert plan.evaluate_inputs("seed1/sida")["network"] == "results/digits-weak-teacher/seed1/sida/network.pt"
    assert plan.evaluate_kind("teacher") == "teacher" and plan.evaluate_kind("seed1/sida") == "generator"
    assert plan.evaluate_name_args("teacher") == ["--name", "teacher"]
    args = plan.evaluate_name_args("seed1/sid_lrfake3")
    assert args == ["--name", "sid_lrfake3", "--train-seed", "1", "--steps", "1", "--label", "SiD (lr_fake 3e-4)"]
    assert jobs.shell_join(args).endswith("--label 'SiD (lr_fake 3e-4)'")


def test_few_step_evaluations_and_fetched_assets():
    plan = Plan(_preset("add-cifar10"))
    assert [m for m in plan.evaluated_models if m.startswith("add")] == ["add", "add-4steps"]
    assert plan.evaluate_name_args("add-4steps")[-4:] == ["--steps", "4", "--label", "ADD (4 steps)"]
    inputs = plan.evaluate_inputs("add-4steps")
    assert inputs == {"network": "results/add-cifar10/add/network.pt", "fetched": "results/add-cifar10/fetch/manifest.json"}


def test_a_fetched_teacher_comes_from_the_fetch_job(cifar):
    plan = Plan(cifar)
    assert plan.teacher_pt == "results/cifar10-cond/fetch/teacher.pt"
    assert {"manifest", "teacher", "refstats"} <= set(plan.fetch_outputs) and plan.fetch_settings == {}
    assert plan.distill_inputs("sid") == {"teacher": plan.teacher_pt}


def test_a_text_teacher_is_its_network_file_beside_its_pipeline(default):
    """The testbed's teacher rule outputs its pipeline folder and prompt set too; downstream rules
    read its network file (of that folder), as for every diffusers teacher."""
    plan = Plan(_preset("digits-text"))
    assert plan.teacher_outputs == {"network": "results/digits-text/teacher/network.pt",
                                    "pipeline": "results/digits-text/teacher/pipeline",
                                    "prompts": "results/digits-text/teacher/prompts.txt"}
    assert plan.teacher_pt == plan.teacher_outputs["network"]
    assert plan.distill_inputs("k1") == {"teacher": "results/digits-text/teacher/network.pt"}
    assert Plan(default).teacher_outputs == {"network": "results/digits/teacher/network.pt"}


def test_settings_are_canonical_json_of_the_sections(default):
    text = settings(default, "seed", "data", run="sid")
    assert text.startswith('{"data": {') and text.endswith('"run": "sid", "seed": 0}')
    assert settings({"data": {}}, "seed", "data") == '{"data": {}}'  # a section all defaults: absent


def test_params_hold_what_the_config_sets(default):
    """Jobs' params are the sections without the values equal to their schema default: the
    embedded default sets no `seed` (0) and no evaluate.seed, but its own teacher.kimg."""
    plan = Plan(default)
    teacher = json.loads(plan.rule_settings("teacher"))
    assert "seed" not in teacher and teacher["teacher"]["kimg"] == default["teacher"]["kimg"] != 120
    assert "seed" not in json.loads(plan.rule_settings("evaluate"))["evaluate"]
    run = json.loads(plan.distill_settings("sid"))["run"]
    assert run["init"] == "warmup" and "sigma_init" not in run and run["gen_sigmas"] == [2.5]
    # Filling the defaults back gives the settings the stages read.
    assert validate(copy.deepcopy(plan.set_config)) == default
    # A setting changed, or set to another value than its default, changes the params.
    other = Plan(check_config(_config(evaluate={**_config()["evaluate"], "seed": 1}), "src").config)
    assert other.rule_settings("evaluate") != plan.rule_settings("evaluate")
    assert other.rule_settings("teacher") == plan.rule_settings("teacher")


def _all_params(name: str) -> dict[str, str]:
    plan = Plan(_preset(name))
    return {**{rule: plan.rule_settings(rule) for rule in RULE_SECTIONS},
            **{run: plan.distill_settings(run) for run in plan.runs}}


@pytest.mark.parametrize("name", ["config", "digits-weak-teacher", "cifar10-cond", "ffhq64", "dmd2-imagenet64",
                                  "add-imagenet64", "edm2-img512-m", "ci-diffusers"])
def test_a_schema_that_gains_defaulted_keys_keeps_every_rules_params(name, tmp_path, monkeypatch):
    """An upgrade that adds settings with defaults reruns nothing: every rule's params are those of
    the old schema (Snakemake reruns a job whose params changed)."""
    before = _all_params(name)
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(add_defaulted_keys(load_schema()), sort_keys=False))
    monkeypatch.setattr(config_module, "SCHEMA_PATH", schema)
    cfg = _preset(name)
    assert cfg["new_top"] == 3 and cfg["evaluate"]["during_training"]["new_knob"] == 7  # the keys are there
    assert run_config(cfg, next(iter(cfg["distill"]["runs"])))["new_knob"] is True
    assert _all_params(name) == before


def test_the_resolved_config_is_rewritten_only_when_it_changes(default, tmp_path):
    path = tmp_path / "exp" / "config.yaml"
    write_resolved_config(default, str(path))
    assert path.read_text() == resolved_config_text(default)
    assert yaml.safe_load(path.read_text())["experiment"] == "digits"
    os.utime(path, (1, 1))
    write_resolved_config(default, str(path))
    assert path.stat().st_mtime == 1  # unchanged content: the file is left alone
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary left


# ---- the config check: once, one line ---------------------------------------------------------

def _config(**overrides) -> dict:
    cfg = read_config(REPO / "config" / "config.yaml")
    cfg.update(overrides)
    return cfg


def test_the_config_check_fills_defaults_and_returns_the_plan():
    cfg = _config()
    plan = check_config(cfg, "config/config.yaml")
    assert isinstance(plan, Plan) and plan.config is cfg
    assert cfg["slurm"]["signal_seconds"] == 300 and cfg["results_dir"] == "results"  # schema defaults


@pytest.mark.parametrize("overrides, message", [
    ({"num_procs": "zero"}, "src: num_procs: 'zero' is not of type 'integer'"),
    ({"distill": {"runs": {"a": {"init": "nope", "phases": [{"kind": "sid", "kimg": 1}]}}}},
     "src: distill.runs.a.init: unknown run 'nope' (known: teacher, a)"),
    ({"teacher": {"source": "fetch"}},
     "teacher.source: 'fetch' needs an asset of kind 'teacher' in fetch.assets (or set teacher.source: train)"),
], ids=["schema", "run-reference", "fetch-without-teacher"])
def test_a_bad_config_is_one_line_naming_the_problem(overrides, message):
    with pytest.raises(ConfigError) as exc:
        check_config(_config(**overrides), "src")
    assert str(exc.value) == message


def test_results_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"^results_dir: cannot write under .*f is a file, not a directory"):
        check_config(_config(results_dir=str(tmp_path / "f" / "results")), "src")


def test_how_the_config_is_named_and_found(monkeypatch):
    monkeypatch.chdir(REPO)
    assert config_source([], False) == "config"
    assert config_source([Path("a.yaml"), "b.yaml"], True) == "a.yaml, b.yaml with --config overrides"
    assert default_configfile(str(REPO / "workflow")) == os.path.relpath(REPO / "config" / "config.yaml")
    assert default_configfile("/elsewhere/workflow") == "/elsewhere/config/config.yaml"  # not below the cwd


# ---- resources per rule --------------------------------------------------------------------

def test_cpu_resources_and_threads_of_the_embedded_default(default):
    rj = jobs.RuleJobs(default)
    assert rj.resources("teacher") == {"runtime": 60, "mem_mb": 4000, "cpus_per_task": 2, "gpu": 0, "nodes": 1,
                                       "slurm_extra": "--signal=TERM@300"}  # resources.teacher: procs 2, 2 CPUs
    assert rj.resources("report") == {"runtime": 10, "mem_mb": 2000, "cpus_per_task": 1, "gpu": 0, "nodes": 1}
    assert rj.threads("teacher") == 2 and rj.threads("distill") == 1
    assert rj.stage_threads_args("teacher") == ["--set", "threads=1"] and rj.stage_threads_args("distill") == []


def test_gpu_resources_scale_with_the_processes(cifar):
    rj = jobs.RuleJobs(cifar)
    res = rj.resources("distill")
    assert (res["gpu"], res["nodes"], res["runtime"]) == (4, 1, 2880)
    assert res["cpus_per_task"] == 4 * max(1, cifar["threads"])
    assert rj.resources("fetch")["gpu"] == 0 and rj.resources("fetch")["mem_mb"] == 8000


def test_several_nodes_ask_for_one_task_and_the_gpus_per_node():
    rj = jobs.RuleJobs(_preset("cifar10-cond", nodes=2))
    res = rj.resources("distill")
    assert (res["nodes"], res["gpu"], res["mpi"], res["tasks"]) == (2, 0, "srun", 2)
    assert res["slurm_extra"] == "--ntasks-per-node=1 --gpus-per-node=4 --signal=TERM@300"
    assert rj.resources("evaluate")["nodes"] == 1 and rj.resources("evaluate")["gpu"] == 4  # one node


def test_config_resources_override_and_the_early_signal_is_not_doubled():
    cfg = _config(resources={"default": {"slurm_partition": "gpu"},
                             "distill": {"runtime": 5, "slurm_extra": "--signal=USR1@60"}}, slurm={"signal_seconds": 0})
    rj = jobs.RuleJobs(check_config(cfg, "src").config)
    assert rj.resources("distill")["slurm_extra"] == "--signal=USR1@60" and rj.resources("distill")["runtime"] == 5
    assert rj.resources("report")["slurm_partition"] == "gpu"
    assert "slurm_extra" not in rj.resources("teacher")  # signal_seconds 0: no early signal


# ---- launch commands -----------------------------------------------------------------------

def test_local_launch_commands(default):
    rj = jobs.RuleJobs(default)
    assert rj.launch_args("teacher") == ["python", "-m", "sida.run.torchrun", "--standalone", "--nproc-per-node", "2"]
    assert rj.launcher("teacher") == f"{TRAP}{TORCHRUN} 2"  # a distributed stage: its shell ignores SIGTERM
    assert rj.launcher("fetch") == f"{TORCHRUN} 1"  # one process, nothing to checkpoint


def test_slurm_and_container_use_the_same_one_node_command(cifar):
    """The SLURM profile and a container (Snakemake wraps the whole shell line in the image) do
    not change a one-node command."""
    rj = jobs.RuleJobs(cifar)
    in_image = jobs.RuleJobs(_preset("cifar10-cond", container={"image": "docker://x/sida:1"}))
    assert rj.launcher("distill") == in_image.launcher("distill") == f"{TRAP}{TORCHRUN} 4"
    assert Plan(in_image.config).image == "docker://x/sida:1"


def test_multi_node_launch_runs_the_node_launcher_under_srun():
    rj = jobs.RuleJobs(_preset("cifar10-cond", nodes=2))
    assert rj.launch_args("distill") == [
        "srun", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "4", "--gpus-per-node", "4",
        "--kill-on-bad-exit=1", "python", "-m", "sida.run.launch", "--nproc-per-node", "4"]
    assert rj.launcher("distill").startswith(f"{TRAP}srun --nodes 2 ")
    assert rj.launcher("evaluate") == f"{TRAP}{TORCHRUN} 4"  # evaluation stays on one node
    cpu = jobs.RuleJobs(_preset("config", nodes=2, num_procs=1))
    assert "--gpus-per-node" not in cpu.launch_args("distill")


def test_a_failed_stage_repeats_its_error_line_and_keeps_status_75(tmp_path):
    log = tmp_path / "x.log"
    prefix = jobs.SHELL_PREFIX.format()  # as Snakemake's shell.prefix formats it
    for status, want in ((3, 1), (75, 75)):
        log.write_text("[rank 0] error: boom: fix it\nTraceback ...\nlast\n")
        cmd = prefix + f"(exit {status}) || stage_failed seed1/sid {shlex.quote(str(log))}"
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == want
        assert r.stderr.strip() == f"[seed1/sid] [rank 0] error: boom: fix it (log: {log})"


# ---- Snakemake inside a SLURM job; the profile note -------------------------------------------

def test_the_slurm_job_step_is_recognised():
    assert jobs.in_slurm_job_step(["snakemake", "--mode", "remote"], {"SLURM_JOB_ID": "7"})
    assert not jobs.in_slurm_job_step(["snakemake", "--mode", "remote"], {})
    assert not jobs.in_slurm_job_step(["snakemake", "--mode"], {"SLURM_JOB_ID": "7"})
    assert not jobs.in_slurm_job_step(["snakemake", "--mode", "subprocess"], {"SLURM_JOB_ID": "7"})


def test_stop_signals_stay_ignored_when_snakemake_sets_its_handlers():
    code = ("import signal; from sida.run import jobs; jobs.ignore_stop_signals(); "
            "signal.signal(signal.SIGTERM, lambda *a: None); signal.signal(signal.SIGHUP, signal.SIG_IGN); "
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN,"
            " signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout.split() == ["True", "True", "True"], r.stderr


def test_profile_names_from_the_command_line_or_the_environment():
    assert jobs.profile_names(["sm", "--profile", "slurm", "--profile=x"], {}) == ["x", "slurm"]
    assert jobs.profile_names(["sm"], {"SNAKEMAKE_PROFILE": "local"}) == ["local"]
    assert jobs.profile_names(["sm", "--profile"], {}) == []


def test_a_users_profile_shadowed_by_ours_is_named(tmp_path):
    ours = tmp_path / "repo" / "workflow" / "profiles"
    (ours / "slurm").mkdir(parents=True)
    (tmp_path / "repo" / "slurm").symlink_to(ours / "slurm")
    theirs = tmp_path / "xdg" / "snakemake"
    (theirs / "slurm").mkdir(parents=True)

    def notes(argv, launch_dir=tmp_path / "repo"):
        return jobs.shadowed_profile_notes(argv, {}, str(launch_dir), [str(theirs)], str(ours))

    assert notes(["sm", "--profile", "slurm"]) == [
        f"note: --profile slurm is this repository's (slurm -> workflow/profiles/slurm), not yours in "
        f"{theirs / 'slurm'} (left as it is); to use yours on top of ours: --profile slurm --profile {theirs / 'slurm'}"]
    assert notes(["sm", "--profile", "slurm"], launch_dir=tmp_path) == []  # there `slurm` is not ours
    assert notes(["sm", "--profile", "local"]) == []  # no such profile of ours
    assert notes(["sm", "--profile", str(ours / "slurm")]) == []  # a path, not a name
