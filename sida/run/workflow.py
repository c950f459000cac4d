"""The workflow's plan: paths, the DAG derived from the config, and the config check.

`workflow/Snakefile` and `workflow/rules/*.smk` are declarative: they ask a `Plan` built from the
validated config where every output lies and what every job reads, so that this logic is plain
Python, tested without Snakemake (tests/test_workflow_module.py). Resources and the launch command
of each rule are in `sida.run.jobs`.

Paths are strings relative to Snakemake's working directory, as the rules declare them; a
`{seed}` in a path is Snakemake's wildcard for the training seed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from ..errors import ConfigError, output_location_problem
from .config import evaluation_entries, load_schema, run_config, validate
from .configfile import deep_merge, read_config

# The wildcard that stands for a run's training seed in output patterns.
SEED_WILDCARD = "{seed}"


def config_source(configfiles: Iterable[object], overridden: bool) -> str:
    """How errors name the config: its files, and whether --config changed them."""
    source = ", ".join(str(f) for f in configfiles) or "config"
    return source + " with --config overrides" if overridden else source


def default_configfile(basedir: str) -> str:
    """The embedded default config next to the workflow (`<basedir>/../config/config.yaml`),
    relative to the working directory when it lies below it (so messages name it briefly), so that
    `snakemake -s .../workflow/Snakefile -d elsewhere` finds it too."""
    path = os.path.normpath(os.path.join(basedir, "..", "config", "config.yaml"))
    return path if os.path.relpath(path).startswith("..") else os.path.relpath(path)


def compose_config(config: dict, configfiles: Iterable[object], overrides: Mapping) -> dict:
    """Snakemake's `config` rebuilt in place from its files as the stages read a file
    (`read_config`: a preset's `extends` resolved, `1e-4` a number), merged in order as Snakemake
    merges them, then the --config values on top."""
    merged: dict = {}
    for path in configfiles:
        merged = deep_merge(merged, read_config(str(path)))
    merged = deep_merge(merged, overrides)
    config.clear()
    config.update(merged)
    return config


def check_config(config: dict, source: str) -> Plan:
    """The workflow's one config check: fill the schema's defaults into `config` (in place) and
    check it (`sida.run.config.validate`: the key path and the reason, plus what a schema cannot
    say), then what only the workflow needs (a teacher to fetch, writable outputs). Raises a
    ConfigError whose message is the one line to print; returns the plan of the valid config."""
    validate(config, source=source)
    # Snakemake itself fails with a traceback when results_dir lies below a file.
    problem = output_location_problem(config["results_dir"])
    if problem:
        raise ConfigError(f"results_dir: {problem}")
    return Plan(config)  # raises when teacher.source fetch has no teacher asset


def one_of(names: Iterable[str]) -> str:
    """A wildcard regex matching exactly these names (never matches when there are none)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


def settings(config: Mapping, *sections: str, **extra: object) -> str:
    """A canonical JSON string of config sections (and extra values): a job's `params` entry, so
    that the job reruns when one of them changes. A section absent from `config` (all defaults,
    see `without_defaults`) is left out."""
    picked = {s: config[s] for s in sections if s in config}
    picked.update(extra)
    # Snakemake reads "{name}" in a params string as a wildcard: a `{` before a name can only be
    # inside a JSON string (a template such as evaluate.class_prompt), where \u007b is the same text.
    return re.sub(r"\{(?=\s*[.\w])", r"\\u007b", json.dumps(picked, sort_keys=True, default=str))


# The config sections each rule's results depend on (its `params.settings`, Plan.rule_settings);
# a distillation run's are Plan.distill_settings.
RULE_SECTIONS = {"teacher": ("seed", "data", "network", "teacher"), "fetch": ("network", "fetch"),
                 "evaluate": ("seed", "data", "evaluate")}


def _same(a: Any, b: Any) -> bool:
    # JSON equality: 1 == 1.0 == True in Python, but a setting of another type is a setting.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _deref(schema: Mapping, root: Mapping) -> Mapping:
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def without_defaults(value: Any, schema: Mapping, root: Mapping | None = None) -> Any:
    """`value` (a validated config, or a part of it described by `schema`) without the settings
    equal to their schema default, at every level: what the config sets. Filling the defaults in
    again gives `value` back, so jobs' params made of it change when a setting does, and not when
    the schema gains a key with a default (an upgrade keeps a finished folder's results; a changed
    default is, like changed stage code, not seen: --forcerun what it affects). Only a
    key's own `default` counts, as when defaults are filled: a run's setting that refers to a
    `distill` one has none (it replaces the section's value, whatever it is)."""
    root = schema if root is None else root
    schema = _deref(schema, root)
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, Mapping) else None)
            if sub is None:
                out[key] = item
                continue
            item = without_defaults(item, sub, root)
            if not ("default" in sub and _same(item, without_defaults(sub["default"], sub, root))):
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [without_defaults(item, schema["items"], root) for item in value]
    return value


def run_settings_schema(schema: Mapping) -> dict:
    """The schema of a run's merged settings (`run_config`): `distill`'s settings, with their
    defaults, and a run's own keys (any key of a run that is not a `distill` setting)."""
    distill = {k: v for k, v in schema["properties"]["distill"]["properties"].items() if k != "runs"}
    own = {k: v for k, v in schema["definitions"]["run"]["properties"].items() if k not in distill}
    return {"type": "object", "properties": distill | own}


def evaluated_model(name: str) -> tuple[str, str | None]:
    """(evaluation entry, training seed or None) of a model name `<entry>` or `seed<K>/<entry>`."""
    seed, _, entry = name.rpartition("/")
    return entry, (seed[len("seed"):] if seed else None)


def resolved_config_text(config: Mapping) -> str:
    """The content of the resolved config file that every stage reads."""
    return (
        "# Written by the workflow: the validated config (defaults filled) the stages of this\n"
        "# experiment ran with. Rerun a stage by hand with --config on this file.\n"
        + yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
    )


def write_resolved_config(config: Mapping, path: str) -> None:
    """Write `path` atomically, only when its content changes (so its mtime is kept and nothing
    downstream looks outdated)."""
    text = resolved_config_text(config)
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Plan:
    """Every path of an experiment and the inputs of every job, from a validated config.

    Outputs live under <results_dir>/<experiment>/ (`exp`), logs under <exp>/logs/. With a `seeds`
    list every distillation run is trained once per seed, under <exp>/seed<K>/<run>/, so rerunning
    one seed's run touches no other seed.
    """

    def __init__(self, config: dict):
        self.config = config
        # What the config sets (defaults left out): what jobs' params are made of.
        self.schema = load_schema()
        self.set_config = without_defaults(config, self.schema)
        self.results = config["results_dir"]
        self.exp = f"{self.results}/{config['experiment']}"
        self.logs = f"{self.exp}/logs"
        # The resolved config (defaults filled, --config overrides applied) that every stage
        # reads: stages see exactly what the workflow validated. Written when the workflow starts.
        self.config_resolved = f"{self.exp}/config.yaml"
        self.image = config["container"].get("image", "containers/sida.sif")
        self.runs = config["distill"]["runs"]
        self.seeds = config["seeds"]
        # Generator evaluations: one per run with `evaluate: true` and entry of its `eval_steps`,
        # named `<run>` (one step) or `<run>-<k>steps`, each with its report label.
        self.eval_entries = evaluation_entries(config)
        # Evaluated models: `teacher` and each entry, or `seed<K>/<entry>` per training seed.
        self.evaluated_models = ["teacher"] + [
            os.path.relpath(d, self.exp) for entry in self.eval_entries for d in self.run_instances(entry)]
        self._plan_fetch()
        self.evaluations = [f"{self.exp}/evaluate/{name}/metrics.json" for name in self.evaluated_models]
        self.evaluation_grids = [f"{self.exp}/evaluate/{name}/samples.png" for name in self.evaluated_models]
        self.training_metrics = [f"{d}/metrics.jsonl" for run in self.runs for d in self.run_instances(run)]
        self.report_dir = f"{self.exp}/report"
        self.report_md = f"{self.report_dir}/report.md"
        self.report_html = f"{self.report_dir}/report.html"
        self.exports = [f"{self.exp}/export/{run}" for run in config["export"]["runs"]]

    def _plan_fetch(self) -> None:
        """External assets (the fetch job's outputs) and where the teacher network comes from."""
        teacher = self.config["teacher"]
        fetch_dir = f"{self.exp}/fetch"
        assets = [a for a in (self.config["fetch"].get("assets") or []) if isinstance(a, dict)]
        # What the fetch stage writes: converted networks, reference statistics, the manifest (last).
        self.fetch_outputs = {"manifest": f"{fetch_dir}/manifest.json"}
        for asset in assets:
            if asset.get("kind") == "teacher":
                self.fetch_outputs["teacher"] = f"{fetch_dir}/teacher.pt"
            elif asset.get("kind") == "refstats":
                self.fetch_outputs["refstats"] = f"{fetch_dir}/refstats.npz"
            elif asset.get("kind") == "sid_generator":
                self.fetch_outputs[f"generator_{asset.get('name')}"] = f"{fetch_dir}/{asset.get('name')}.pt"
        # What the fetch job's outputs depend on besides its sections (its rerun trigger): for a
        # diffusers teacher, which the fetch stage imports as teacher.pt, the teacher's folder.
        self.fetch_settings: dict = {}
        if teacher["source"] == "diffusers":
            self.fetch_outputs["teacher"] = f"{fetch_dir}/teacher.pt"
            self.fetch_settings = {"diffusers_teacher": {k: teacher.get(k) for k in ("path", "url", "hub")}}
        # The teacher stage's own outputs besides samples.png and metrics.jsonl (its rule's): a
        # network file, which downstream rules read, and for the text testbed also the pipeline
        # folder (a directory output the network file points at) and its prompt set.
        self.teacher_outputs = {"network": f"{self.exp}/teacher/network.pt"}
        if teacher["source"] == "train_text":
            self.teacher_outputs.update(pipeline=f"{self.exp}/teacher/pipeline",
                                        prompts=f"{self.exp}/teacher/prompts.txt")
        if teacher["source"] in ("train", "train_text"):
            self.teacher_pt = self.teacher_outputs["network"]
        elif "teacher" in self.fetch_outputs:
            self.teacher_pt = self.fetch_outputs["teacher"]
        else:
            raise ConfigError("teacher.source: 'fetch' needs an asset of kind 'teacher' in fetch.assets "
                              "(or set teacher.source: train)")
        # Evaluation may read fetched assets (reference statistics, Inception weights, the dataset).
        self.fetch_deps = {"fetched": self.fetch_outputs["manifest"]} if assets else {}

    # ---- distillation runs ------------------------------------------------------------------
    def run_dir(self, run: str, seed: object = SEED_WILDCARD) -> str:
        """A run's output folder: <exp>/<run>, or <exp>/seed<seed>/<run> with training seeds (by
        default the `{seed}` wildcard, so the same path serves as an output pattern and an input)."""
        return f"{self.exp}/{run}" if self.seeds is None else f"{self.exp}/seed{seed}/{run}"

    def run_instances(self, run: str) -> list[str]:
        """The folders of every trained copy of a run: one per training seed."""
        return [self.run_dir(run)] if self.seeds is None else [self.run_dir(run, s) for s in self.seeds]

    def run_log(self, run: str) -> str:
        """A distillation job's log (a `{seed}` wildcard in it with training seeds)."""
        return f"{self.logs}/distill/{os.path.relpath(self.run_dir(run), self.exp)}.log"

    def distill_inputs(self, run: str) -> dict[str, str]:
        """Teacher network, plus the final state of the `init` run and the generator of the
        `init_generator` run when the run starts from another one (of the same training seed)."""
        spec = self.runs[run]
        inputs = {"teacher": self.teacher_pt}
        if spec["init"] != "teacher":
            inputs["init"] = f"{self.run_dir(spec['init'])}/state.pt"
        if spec["init_generator"] is not None:
            inputs["init_generator"] = f"{self.run_dir(spec['init_generator'])}/network.pt"
        features = run_config(self.config, run)["add_features"]
        if spec.get("discriminator") == "add" and features["kind"] == "dinov2" and features["weights"] is None:
            inputs.update(self.fetch_deps)  # ADD's DINOv2 weights: fetch/dinov2_<arch>.pth
        return inputs

    def run_priority(self, run: str) -> int:
        """How many runs start, directly or not, from `run` (its `init` or `init_generator` chain):
        the Snakemake priority of the run's job. When CPUs are short, runs that others wait for go
        first (the embedded default's warmup, then sid, which sid2a needs), so the longest path of
        the DAG does not wait behind a run or an evaluation that nothing depends on."""

        def sources(name: str) -> set[str]:
            spec = self.runs[name]
            return {s for s in (spec["init"], spec["init_generator"]) if s in self.runs}

        def depends_on(name: str, seen: tuple[str, ...] = ()) -> set[str]:
            direct = sources(name)
            return direct | {a for s in direct if s not in seen for a in depends_on(s, (*seen, s))}

        return sum(1 for other in self.runs if other != run and run in depends_on(other))

    def distill_init_args(self, inputs: Mapping[str, str], seed: str | None) -> list[str]:
        """The distill stage's --init / --init-generator arguments, from the job's inputs, and its
        training seed (--set seed=K) when the config lists `seeds`."""
        args = []
        if "init" in inputs:
            args += ["--init", inputs["init"]]
        if "init_generator" in inputs:
            args += ["--init-generator", inputs["init_generator"]]
        if self.seeds is not None:
            args += ["--set", f"seed={seed}"]
        return args

    def job_label(self, run: str, seed: str | None = None) -> str:
        """How errors name a distillation job: the run, prefixed by its training seed folder."""
        return run if self.seeds is None else f"seed{seed}/{run}"

    def distill_settings(self, run: str) -> str:
        """What a run's result depends on: `settings` of its sections and its merged run config,
        each without the values equal to their schema default."""
        run_settings = without_defaults(run_config(self.config, run), run_settings_schema(self.schema), self.schema)
        return settings(self.set_config, "seed", "data", "network", run=run_settings)

    def rule_settings(self, rule: str) -> str:
        """What a job of `rule` (RULE_SECTIONS) depends on: its sections without their default
        values, and for the fetch job what else its outputs depend on (`fetch_settings`)."""
        return settings(self.set_config, *RULE_SECTIONS[rule], **(self.fetch_settings if rule == "fetch" else {}))

    # ---- evaluations and exports ----------------------------------------------------------
    def evaluate_inputs(self, name: str) -> dict[str, str]:
        """The network to evaluate (the teacher's or, for an evaluation entry, its run's EMA
        generator of the model's training seed) and fetched assets."""
        if name == "teacher":
            network = self.teacher_pt
        else:
            entry, seed = evaluated_model(name)
            network = f"{self.run_dir(self.eval_entries[entry]['run'], seed)}/network.pt"
        return {"network": network, **self.fetch_deps}

    @staticmethod
    def evaluate_kind(name: str) -> str:
        """The evaluate stage's --kind of a model: the teacher or a generator."""
        return "teacher" if name == "teacher" else "generator"

    def evaluate_name_args(self, name: str) -> list[str]:
        """--name ENTRY (the report groups training seeds by it), plus --train-seed K for a model
        `seed<K>/<entry>` and, for a generator, the entry's --steps and --label."""
        if name == "teacher":
            return ["--name", "teacher"]
        entry, seed = evaluated_model(name)
        spec = self.eval_entries[entry]
        args = ["--name", entry] + (["--train-seed", seed] if seed is not None else [])
        return args + ["--steps", str(spec["steps"]), "--label", spec["label"]]

    def export_network(self, run: str) -> str:
        """The network file an export job reads: the run's final EMA generator (first training seed)."""
        return f"{self.run_instances(run)[0]}/network.pt"


def wildcard_names(plan: Plan) -> dict[str, str]:
    """The workflow's wildcard constraints: evaluated model names and training seeds."""
    return {"name": one_of(plan.evaluated_models), "seed": one_of([str(s) for s in plan.seeds or []])}


def first_output_dir(outputs: Sequence[str]) -> str:
    """A stage's --out directory: where the job's first declared output lies."""
    return os.path.dirname(outputs[0])
