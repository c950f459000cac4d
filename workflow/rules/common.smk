# Shared by all rules: the names the rule files use, taken from the plan of the validated config
# (PLAN, sida.run.workflow: paths and the DAG) and its jobs (JOBS, sida.run.jobs: resources and
# launch commands). Nothing is decided here: the logic is in those modules, tested without
# Snakemake; the functions below only hand Snakemake's wildcards and inputs to them.

import os
import sys

from sida.run import jobs
from sida.run.workflow import first_output_dir, one_of, wildcard_names

JOBS = jobs.RuleJobs(config)

EXP = PLAN.exp
LOGS = PLAN.logs
CONFIG_RESOLVED = PLAN.config_resolved
IMAGE = PLAN.image
RUNS = PLAN.runs
SEEDS = PLAN.seeds
FETCH_OUTPUTS = PLAN.fetch_outputs
EVALUATIONS = PLAN.evaluations
EVALUATION_GRIDS = PLAN.evaluation_grids
TRAINING_METRICS = PLAN.training_metrics
REPORT_DIR = PLAN.report_dir
REPORT_MD = PLAN.report_md
REPORT_HTML = PLAN.report_html
EXPORTS = PLAN.exports

# Inside a SLURM job, Snakemake and the job's shell leave SIGTERM, SIGUSR1 and SIGINT to the stage.
if jobs.in_slurm_job_step(sys.argv, os.environ):
    jobs.ignore_stop_signals()


wildcard_constraints:
    **wildcard_names(PLAN),


shell.prefix(jobs.SHELL_PREFIX)

run_dir = PLAN.run_dir
run_log = PLAN.run_log
distill_inputs = PLAN.distill_inputs
run_priority = PLAN.run_priority
distill_settings = PLAN.distill_settings
rule_settings = PLAN.rule_settings
rule_resources = JOBS.resources
rule_threads = JOBS.threads
launcher = JOBS.launcher


def stage_threads_arg(rule):
    return jobs.shell_join(JOBS.stage_threads_args(rule), leading_space=True)


def job_label(run):
    return run if SEEDS is None else lambda wildcards: PLAN.job_label(run, wildcards.seed)


def distill_init_args(wildcards, input):
    args = PLAN.distill_init_args(dict(input.items()), getattr(wildcards, "seed", None))
    return jobs.shell_join(args, leading_space=True)


def output_dir(wildcards, output):
    return first_output_dir(output)


def evaluate_inputs(wildcards):
    return PLAN.evaluate_inputs(wildcards.name)


def evaluate_kind(wildcards):
    return PLAN.evaluate_kind(wildcards.name)


def evaluate_name_args(wildcards):
    return jobs.shell_join(PLAN.evaluate_name_args(wildcards.name))


def export_network(wildcards):
    return PLAN.export_network(wildcards.run)


def note_shadowed_profiles():
    # The shell's $PWD is where Snakemake started: it has already changed into --directory.
    launch_dir = os.environ.get("PWD") or os.getcwd()
    notes = jobs.shadowed_profile_notes(sys.argv, os.environ, launch_dir, jobs.snakemake_config_dirs(),
                                        os.path.join(workflow.basedir, "profiles"))
    for line in notes:
        print(line, file=sys.stderr)
