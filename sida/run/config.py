"""Experiment configs: YAML presets validated against one JSON schema, defaults filled.

The schema in `workflow/schemas/config.schema.yaml` is the single source of truth: `validate`
checks a config against it for the workflow (once, in `sida.run.workflow.check_config`) and for a
stage run by hand (`load_config`), so both see the same defaults and reject the same mistakes
before any work starts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from jsonschema import Draft202012Validator, validators

from ..errors import ConfigError
from .configfile import parse_value, read_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
# Names of stages and output folders under results/<experiment>/: a run cannot use them.
RESERVED_RUN_NAMES = frozenset({"teacher", "fetch", "evaluate", "report", "export", "logs", "wandb", "all"})


def _with_defaults(cls):
    """A validator class that fills `default` values into instances while validating."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


_Validator = _with_defaults(Draft202012Validator)


def load_schema() -> dict:
    """The experiment config schema as a dict."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def validate(cfg: dict, source: str = "config") -> dict:
    """Fill defaults into `cfg` (in place) and check it; raise ConfigError naming the key path."""
    validator = _Validator(load_schema())
    # Two passes: the first fills defaults (so nested objects exist), the second reports.
    for _ in validator.iter_errors(cfg):
        pass
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {_key_path(e)}: {e.message}{more}")
    _check_semantics(cfg, source)
    return cfg


def _check_semantics(cfg: dict, source: str) -> None:
    """Rules a JSON schema cannot say: references between runs, batch divisibility."""
    runs = cfg["distill"]["runs"]
    for name in runs:
        if name in RESERVED_RUN_NAMES or re.fullmatch(r"seed\d+", name):
            raise ConfigError(f"{source}: distill.runs.{name}: the name '{name}' is taken by a stage or an output "
                              f"folder ({', '.join(sorted(RESERVED_RUN_NAMES))}, seed<K>): rename the run")
    for name, run in runs.items():
        for key in ("init", "init_generator"):
            ref = run.get(key)
            if ref is None or (key == "init" and ref == "teacher"):
                continue
            if ref not in runs:
                raise ConfigError(f"{source}: distill.runs.{name}.{key}: unknown run '{ref}' "
                                  f"(known: teacher, {', '.join(runs)})")
            if ref == name:
                raise ConfigError(f"{source}: distill.runs.{name}.{key}: a run cannot start from itself")
        _check_method(cfg, name, source)
    _check_cycles(runs, source)
    # A rule's own process count is what its batches are split over.
    if cfg["teacher"]["source"] == "train":  # a fetched teacher is not trained: its batch is unused
        _check_batch(cfg["teacher"], "teacher", rule_procs(cfg, "teacher") * cfg["nodes"], source)
    procs = rule_procs(cfg, "distill") * cfg["nodes"]
    _check_batch(cfg["distill"], "distill", procs, source)
    for name in runs:  # the merged per-run batch settings (a run may set its own)
        rc = run_config(cfg, name)
        where = f"distill.runs.{name}" if {"batch", "batch_per_proc"} & set(runs[name]) else "distill"
        _check_batch(rc, where, procs, source)
    _check_balanced_labels(cfg, source)
    _check_extra_extractors(cfg, source)
    _check_diffusers_teacher(cfg, source)
    for name in cfg["export"]["runs"]:
        if name not in runs:
            raise ConfigError(f"{source}: export.runs: unknown run '{name}' (known: {', '.join(runs)})")


def _check_diffusers_teacher(cfg: dict, source: str) -> None:
    """teacher.source diffusers: a path or url; a local folder that exists must hold a supported
    model (its JSON files are read; weights are loaded by the fetch stage). A folder that does
    not exist yet is the fetch job's error (one line too): presets may name folders made later."""
    t = cfg["teacher"]
    if t["source"] != "diffusers":
        if t["path"] is not None or t["url"] is not None or t.get("hub") is not None:
            raise ConfigError(f"{source}: teacher.path / teacher.url / teacher.hub apply to teacher.source: "
                              f"diffusers only")
        return
    if any(a.get("kind") == "teacher" for a in (cfg.get("fetch") or {}).get("assets") or [] if isinstance(a, dict)):
        raise ConfigError(f"{source}: fetch.assets: teacher.source diffusers takes the teacher from teacher.path / "
                          f"teacher.url: remove the asset of kind 'teacher'")
    if t["path"] is None and t["url"] is None and t.get("hub") is None:
        raise ConfigError(f"{source}: teacher.source diffusers needs teacher.path (a local folder), teacher.hub (a "
                          f"hub repository id) or teacher.url")
    if t["path"] is None or not Path(t["path"]).expanduser().exists():
        return
    from ..errors import AssetError
    from ..io.diffusers_teacher import check_folder  # JSON only: no torch, no diffusers

    try:
        check_folder(t["path"])
    except AssetError as exc:
        raise ConfigError(f"{source}: teacher.path: {exc}") from None


@functools.cache
def methods_table() -> dict[str, dict]:
    """The schema's `x-methods`: per method, its phase kinds, the discriminators its runs may train
    and the phases whose generator loss needs one (`warmup` trains whichever method's critic)."""
    return load_schema()["x-methods"]


def _phase_method() -> dict[str, str]:
    return {kind: method for method, m in methods_table().items() for kind in m["phases"]}


def discriminator_kind(value: bool | str | None) -> str:
    """A run's `discriminator` as a kind: booleans are today's (true = sida, false = none)."""
    if value is True:
        return "sida"
    if value is False or value is None:
        return "none"
    return str(value)


def run_method(phases: list[dict]) -> str:
    """The method a run's phases belong to ('sid', 'dmd' or 'add'); a warm-up-only run is 'sid'.
    Raises ValueError when phases of several methods are mixed in one run."""
    phase_method = _phase_method()
    methods = {phase_method[p["kind"]] for p in phases if p["kind"] in phase_method}
    if len(methods) > 1:
        raise ValueError(f"phases of several methods ({', '.join(sorted(methods))}) in one run")
    return methods.pop() if methods else "sid"


def _check_method(cfg: dict, name: str, source: str) -> None:
    """A run's phases, discriminator and method-specific settings fit together."""
    rc = run_config(cfg, name)
    where = f"{source}: distill.runs.{name}"
    try:
        method = run_method(rc["phases"])
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}: split them into runs that start from each other") from None
    disc = discriminator_kind(rc["discriminator"])
    kinds = [p["kind"] for p in rc["phases"]]
    table = methods_table()[method]
    for kind, needed in table["needs"].items():
        if kind in kinds and disc != needed:
            value = "true" if needed == "sida" else needed
            raise ConfigError(f"{where}: a '{kind}' phase needs discriminator: {value} (the run has {disc})")
    if disc not in table["discriminators"]:
        raise ConfigError(f"{where}: discriminator {disc} does not go with {method} phases (allowed: "
                          f"{', '.join(table['discriminators'])})")
    if method == "add" and "warmup" in kinds and disc == "none":
        raise ConfigError(f"{where}: a 'warmup' phase of an ADD run trains its discriminator heads: set "
                          f"discriminator: add or drop the phase")
    if method != "sid":
        for key, off in (("augment", 0), ("logvar", False)):
            if rc[key] != off:
                raise ConfigError(f"{where}.{key}: {method} runs do not support it yet: set {key}: {off}")
        if rc["init_generator"] is not None:
            raise ConfigError(f"{where}.init_generator: only SiD-family runs start their generator from another run's")
        if method == "add" and "sigma_init" in cfg["distill"]["runs"][name]:
            raise ConfigError(f"{where}.sigma_init: an ADD run generates from its largest student level "
                              f"(add_student_steps[0]): drop sigma_init")
    for key in ("dm_index_range", "add_distill_index_range"):
        lo, hi = rc[key]
        if lo > hi:
            raise ConfigError(f"{where}.{key}: {rc[key]} is not a range (low > high)")
    steps = rc["eval_steps"]
    most = len(rc["add_student_steps"]) if method == "add" else 1
    if max(steps) > most:
        raise ConfigError(f"{where}.eval_steps: {max(steps)} steps, but this run's generator samples in at most "
                          f"{most} (ADD: one per student level)")
    names = set(cfg["distill"]["runs"]) | {"teacher"}
    for entry in evaluation_entries({"distill": {"runs": {name: cfg["distill"]["runs"][name]}}}):
        if entry in names and entry != name:
            raise ConfigError(f"{where}.eval_steps: its evaluation '{entry}' has the name of a run: rename the run")


def _check_batch(sec: dict, where: str, procs: int, source: str) -> None:
    per = sec.get("batch_per_proc")
    if per is not None and sec["batch"] % (per * procs) != 0:
        raise ConfigError(f"{source}: {where}.batch_per_proc: batch {sec['batch']} is not a multiple of "
                          f"batch_per_proc {per} x {procs} processes")
    if per is None and sec["batch"] % procs != 0:
        raise ConfigError(f"{source}: {where}.batch: {sec['batch']} is not divisible by {procs} processes")


def _check_balanced_labels(cfg: dict, source: str) -> None:
    """Balanced evaluation labels give equal class counts only for multiples of label_dim samples."""
    k, ev = cfg["data"]["label_dim"], cfg["evaluate"]
    if ev["labels"] != "balanced" or k == 0:
        return
    for key, n in (("num_samples", ev["num_samples"]), ("during_training.num_samples",
                                                        ev["during_training"]["num_samples"])):
        if n % k:
            raise ConfigError(f"{source}: evaluate.{key}: {n} is not a multiple of data.label_dim {k}, so balanced "
                              f"labels cannot give every class the same count: use a multiple of {k}")


def resolve_extractor_name(cfg: dict) -> str:
    """`evaluate.extractor`, with 'auto' = the digits classifier for digits data, Inception otherwise."""
    name = cfg["evaluate"]["extractor"]
    if name == "auto":
        return "digits_classifier" if cfg["data"]["kind"] == "digits" else "inception"
    return name


def _check_extra_extractors(cfg: dict, source: str) -> None:
    main = resolve_extractor_name(cfg)
    if main in cfg["evaluate"]["extra_extractors"]:
        raise ConfigError(f"{source}: evaluate.extra_extractors: '{main}' is already the main extractor "
                          f"(evaluate.extractor): list only other feature networks")


def _check_cycles(runs: dict, source: str) -> None:
    def deps(name: str) -> list[str]:
        run = runs[name]
        return [r for r in (run.get("init"), run.get("init_generator")) if r and r != "teacher"]

    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ConfigError(f"{source}: distill.runs: runs start from each other in a cycle: "
                              f"{' -> '.join(trail + [name])}")
        state[name] = 1
        for d in deps(name):
            visit(d, trail + [name])
        state[name] = 2

    for n in runs:
        visit(n, [])


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML experiment config (its `extends` resolved), apply overrides, fill defaults and
    validate it."""
    raw = read_config(path)
    apply_overrides(raw, overrides)
    return validate(raw, source=str(path))


def config_hash(cfg: dict) -> str:
    """A short stable hash of a resolved config (recorded in checkpoints and metrics)."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def with_data_of(cfg: dict, section: str) -> dict:
    """The config as a stage of `section` reads it: `data` is `<section>.data` when that is set.
    A text run trains on prompts (`data`) while its teacher (testbed: `teacher.data`) trains on,
    and its evaluation (`evaluate.data`) scores against, images."""
    data = (cfg.get(section) or {}).get("data")
    return cfg if data is None else {**cfg, "data": data}


def distill_defaults() -> dict:
    """The schema's default of every `distill` setting (not `runs`): what a hand-made run config
    (tests, benchmarks) falls back on, from the same single source as a validated config."""
    props = load_schema()["properties"]["distill"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if k != "runs" and "default" in v}


# Keys of a run entry that are not `distill` settings: where the run starts, what it trains.
RUN_ONLY_KEYS = ("init", "init_generator", "discriminator", "phases", "evaluate", "label", "eval_steps")


def rule_procs(cfg: dict, rule: str) -> int:
    """Processes per node of a distributed workflow rule's jobs (teacher, distill, evaluate):
    `resources.<rule>.procs`, else `num_procs`."""
    return ((cfg.get("resources") or {}).get(rule) or {}).get("procs", cfg["num_procs"])


def run_config(cfg: dict, run: str) -> dict:
    """The distillation settings of one run: `distill` with every setting the run sets itself
    (`distill.runs.<run>.<key>`, any key of `distill` but `runs`) replacing the section's value,
    plus the run's own keys, and the values they imply (`resolve_run`)."""
    runs = cfg["distill"]["runs"]
    if run not in runs:
        raise ConfigError(f"unknown run '{run}': the config defines {', '.join(runs) or 'no runs'}")
    merged = {k: v for k, v in cfg["distill"].items() if k != "runs"}
    merged.update(copy.deepcopy(runs[run]))  # a key present in the run wins, even an explicit null
    return resolve_run(merged)


def resolve_run(rc: dict, teacher: Any = None) -> dict:
    """A copy of run settings `rc` with the values they imply, computed here only: `adam_eps:
    null` -> the official rule (1e-6 with fp16, else 1e-8); with the run's teacher, a diffusers
    teacher's `init_timestep` k -> `sigma_init` = its sigma_k (SiD-LSG's 625); then the generation
    sigmas (`gen_sigmas`, `generation_sigmas`) and `sigma_init`, their first. Without a teacher
    (config resolution) an `init_timestep`'s sigma is left to the loop, which has one."""
    rc = dict(rc)
    if rc.get("adam_eps") is None:
        rc["adam_eps"] = 1e-6 if rc.get("precision") == "fp16" else 1e-8
    if teacher is not None and rc.get("init_timestep") is not None:
        rc["sigma_init"] = float(teacher.sigma_at(int(rc["init_timestep"])))
    rc["gen_sigmas"] = generation_sigmas(rc, teacher)
    rc["sigma_init"] = rc["gen_sigmas"][0]
    return rc


def generation_sigmas(rc: dict, teacher: Any = None) -> list[float]:
    """The generation sigmas of a run, recorded in its network file and read by generate and
    evaluate: [sigma_init] (SiD family 2.5, DMD2 80), or ADD's student levels, largest first
    (one-step sampling starts from the first, k-step sampling visits k of them): steps of the
    Karras grid, or a diffusers text teacher's own discrete timesteps (ADD's 999/749/499/249)."""
    if any(p["kind"] == "add" for p in rc["phases"]):
        if teacher is not None and hasattr(teacher, "uncond") and hasattr(teacher, "sigma_at"):
            return [float(teacher.sigma_at(int(k))) for k in rc["add_student_steps"]]
        from ..nets.sampler import add_student_sigmas  # late: torch only for ADD runs

        return add_student_sigmas(rc["add_student_steps"])
    return [float(rc["sigma_init"])]


def evaluation_entries(cfg: dict) -> dict[str, dict]:
    """The generator evaluations of a config: name -> {run, steps, label}. A run with
    `evaluate: true` is evaluated once per entry of its `eval_steps`: the one-step evaluation is
    named after the run, a k-step one `<run>-<k>steps`; labels are the run's `label` (default its
    name), with the step count when the run has several ('ADD (1 step)', 'ADD (4 steps)')."""
    out = {}
    for run, spec in cfg["distill"]["runs"].items():
        if not spec.get("evaluate", True):
            continue
        steps = spec.get("eval_steps") or [1]
        base = spec.get("label") or run
        for k in steps:
            label = base if len(steps) == 1 and k == 1 else f"{base} ({k} step{'s' if k > 1 else ''})"
            out[run if k == 1 else f"{run}-{k}steps"] = {"run": run, "steps": int(k), "label": label}
    return out
