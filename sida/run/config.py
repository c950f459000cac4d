"""Experiment configs: YAML presets validated against one JSON schema, defaults filled.

The schema in `workflow/schemas/config.schema.yaml` is the single source of truth: Snakemake's
`validate` uses it for the workflow and `load_config` uses it for a stage run by hand, so both
see the same defaults and reject the same mistakes before any work starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from jsonschema import Draft202012Validator, validators

from ..errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
# Names of stages and output folders under results/<experiment>/: a run cannot use them.
RESERVED_RUN_NAMES = frozenset({"teacher", "fetch", "evaluate", "report", "logs", "wandb", "all"})


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
        if name in RESERVED_RUN_NAMES:
            raise ConfigError(f"{source}: distill.runs.{name}: the name '{name}' is taken by a stage or an output "
                              f"folder ({', '.join(sorted(RESERVED_RUN_NAMES))}): rename the run")
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
        if any(p["kind"] == "sida" for p in run["phases"]) and not run["discriminator"]:
            raise ConfigError(f"{source}: distill.runs.{name}: a 'sida' phase needs discriminator: true")
    _check_cycles(runs, source)
    procs = cfg["num_procs"] * cfg["nodes"]
    _check_batch(cfg["teacher"], "teacher", procs, source)
    _check_batch(cfg["distill"], "distill", procs, source)
    for name in runs:  # the merged per-run batch settings (a run may set its own)
        rc = run_config(cfg, name)
        where = f"distill.runs.{name}" if {"batch", "batch_per_proc"} & set(runs[name]) else "distill"
        _check_batch(rc, where, procs, source)


def _check_batch(sec: dict, where: str, procs: int, source: str) -> None:
    per = sec.get("batch_per_proc")
    if per is not None and sec["batch"] % (per * procs) != 0:
        raise ConfigError(f"{source}: {where}.batch_per_proc: batch {sec['batch']} is not a multiple of "
                          f"batch_per_proc {per} x {procs} processes")
    if per is None and sec["batch"] % procs != 0:
        raise ConfigError(f"{source}: {where}.batch: {sec['batch']} is not divisible by {procs} processes")


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


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def _parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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
        node[parts[-1]] = _parse_value(value)
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML experiment config, apply overrides, fill defaults and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with a file under config/")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    apply_overrides(raw, overrides)
    return validate(raw, source=str(path))


def config_hash(cfg: dict) -> str:
    """A short stable hash of a resolved config (recorded in checkpoints and metrics)."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def distill_defaults() -> dict:
    """The schema's default of every `distill` setting (not `runs`): what a hand-made run config
    (tests, benchmarks) falls back on, from the same single source as a validated config."""
    props = load_schema()["properties"]["distill"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if k != "runs" and "default" in v}


# Keys of a run entry that are not `distill` settings: where the run starts, what it trains.
RUN_ONLY_KEYS = ("init", "init_generator", "discriminator", "phases", "evaluate")


def run_config(cfg: dict, run: str) -> dict:
    """The distillation settings of one run: `distill` with every setting the run sets itself
    (`distill.runs.<run>.<key>`, any key of `distill` but `runs`) replacing the section's value,
    plus the run's own keys. `adam_eps: null` resolves to the official rule (1e-6 with fp16,
    else 1e-8)."""
    runs = cfg["distill"]["runs"]
    if run not in runs:
        raise ConfigError(f"unknown run '{run}': the config defines {', '.join(runs) or 'no runs'}")
    merged = {k: v for k, v in cfg["distill"].items() if k != "runs"}
    merged.update(copy.deepcopy(runs[run]))  # a key present in the run wins, even an explicit null
    if merged.get("adam_eps") is None:
        merged["adam_eps"] = 1e-6 if merged.get("precision") == "fp16" else 1e-8
    return merged
