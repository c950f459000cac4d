"""Reading experiment config files: YAML, and a preset's `extends`.

A preset may extend another: the top-level key `extends: <file>` (relative to the preset's own
folder) names a base whose settings the preset's replace. Mappings merge key by key; anything
else (a list, a scalar, a null) replaces the base's value whole. A base may extend another; a
cycle is refused. The result holds no `extends`.

Every reader of a config file goes through `read_config`: the stages' --config
(`sida.run.config.load_config`) and the workflow's config files (`sida.run.workflow.compose_config`),
so both see the same dict before defaults and validation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, require_file

EXTENDS = "extends"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A YAML value as config files read it (`key=value` overrides)."""
    return yaml.load(text, Loader=_Loader)


def _plain(value: Any) -> Any:
    """A copy with every mapping a dict (Snakemake hands --config values as immutable maps)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """`over` on top of `base`, as a new dict: mappings merge key by key, other values of `over`
    replace the base's whole (Snakemake merges --configfile files and --config the same way)."""
    out = _plain(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _plain(value)
    return out


def _read_yaml(path: Path) -> dict:
    require_file(path, "config file", ConfigError, "pass --config with a file under config/")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (not UTF-8): pass a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def read_config(path: str | Path) -> dict:
    """A config file's settings, its `extends` chain resolved (no defaults, not validated);
    a ConfigError of one line for an unreadable file, a missing base or a cycle."""
    return _read(Path(path), ())


def _read(path: Path, chain: tuple[Path, ...]) -> dict:
    raw = _read_yaml(path)
    if EXTENDS not in raw:
        return raw
    name = raw.pop(EXTENDS)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: extends: {name!r} is not a file name: name the base preset's file, "
                          f"relative to {path.parent}")
    base = path.parent / name
    trail = (*chain, path)
    if base.resolve() in {p.resolve() for p in trail}:
        cycle = " -> ".join(str(p) for p in (*trail, base))
        raise ConfigError(f"{path}: extends: presets extend each other in a cycle ({cycle}): "
                          f"remove one of these `extends`")
    if not base.is_file():
        raise ConfigError(f"{path}: extends: base file {base} does not exist: fix the name "
                          f"(it is relative to the preset's folder {path.parent})")
    return deep_merge(_read(base, trail), raw)
