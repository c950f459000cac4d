"""Preset files: a preset extends another (`extends`, sida.run.configfile), the workflow reads a
file as the stages do, and every preset still loads to the dict it loaded to before presets were
rewritten as a base plus what differs (a fingerprint per preset, tests/data/preset_fingerprints.json).

Rewrite the fingerprints (only for a preset whose settings change on purpose):
`python tests/test_preset_files.py`."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: this checkout's sida

from sida.errors import ConfigError  # noqa: E402
from sida.run.config import load_config, load_schema  # noqa: E402
from sida.run.configfile import read_config  # noqa: E402
from sida.run.workflow import check_config, compose_config, without_defaults  # noqa: E402

CONFIG_DIR = REPO / "config"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))
FINGERPRINTS = REPO / "tests" / "data" / "preset_fingerprints.json"


def fingerprint(path: Path) -> str:
    """sha256 of the canonical JSON of what a preset sets once loaded (defaults filled, then the
    values equal to their default left out): what the stages see, and unchanged when the schema
    gains a key with a default."""
    cfg = without_defaults(load_config(path), load_schema())
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- every preset loads to the dict it loaded to before -----------------------------------------

def test_every_preset_has_a_fingerprint():
    assert sorted(json.loads(FINGERPRINTS.read_text())) == sorted(p.stem for p in PRESETS), \
        "a preset was added or removed: rewrite the fingerprints (see this file's docstring)"


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_to_its_fingerprint(path):
    want = json.loads(FINGERPRINTS.read_text()).get(path.stem)
    assert fingerprint(path) == want, f"{path.name} no longer loads to the settings it had"


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_the_workflow_reads_a_preset_as_the_stages_do(path):
    """Snakemake's config (the file as Snakemake loads it) rebuilt by compose_config is the dict a
    stage's --config gives."""
    config = yaml.safe_load(path.read_text())
    compose_config(config, [path], {})
    assert check_config(config, str(path)).config == load_config(path)


def test_the_workflow_puts_config_overrides_on_top(tmp_path):
    _write(tmp_path / "base.yaml", {"experiment": "b", "distill": {"batch": 32, "lr_g": 0.5}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "distill": {"batch": 16}})
    config = {"stale": True}
    compose_config(config, [child], {"experiment": "x", "distill": {"lr_g": 0.25}})
    assert config == {"experiment": "x", "distill": {"batch": 16, "lr_g": 0.25}}


# ---- extends ---------------------------------------------------------------------------------

def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_chain_merges_mappings_and_replaces_lists_and_scalars(tmp_path):
    _write(tmp_path / "bases" / "root.yaml", {
        "experiment": "root", "seeds": [0, 1, 2],
        "network": {"precond": "EDMPrecond", "kwargs": {"model_channels": 8, "channel_mult": [1, 2]}}})
    _write(tmp_path / "bases" / "mid.yaml", {"extends": "root.yaml", "network": {"kwargs": {"model_channels": 16}}})
    leaf = _write(tmp_path / "leaf.yaml", {"extends": "bases/mid.yaml", "experiment": "leaf", "seeds": [5],
                                           "network": {"kwargs": {"channel_mult": [4]}}})
    assert read_config(leaf) == {
        "experiment": "leaf", "seeds": [5],  # scalar and list replaced whole
        "network": {"precond": "EDMPrecond", "kwargs": {"model_channels": 16, "channel_mult": [4]}}}


def test_a_preset_that_extends_loads_validated_with_overrides(tmp_path):
    child = _write(tmp_path / "child.yaml", {"extends": str(CONFIG_DIR / "config.yaml"), "experiment": "child"})
    cfg = load_config(child, ["distill.batch=32"])
    base = load_config(CONFIG_DIR / "config.yaml")
    assert cfg["experiment"] == "child" and cfg["distill"]["batch"] == 32 and "extends" not in cfg
    assert cfg["distill"]["runs"] == base["distill"]["runs"] and cfg["network"] == base["network"]


def test_a_null_replaces_a_base_mapping(tmp_path):
    _write(tmp_path / "base.yaml", {"experiment": "b", "seeds": [1]})
    assert read_config(_write(tmp_path / "c.yaml", {"extends": "base.yaml", "seeds": None})) == \
        {"experiment": "b", "seeds": None}


def test_a_cycle_is_refused_in_one_line(tmp_path):
    a = _write(tmp_path / "a.yaml", {"extends": "b.yaml", "experiment": "a"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError) as exc:
        read_config(a)
    msg = str(exc.value)
    assert "\n" not in msg and "cycle" in msg and f"{a} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}" in msg
    selfish = _write(tmp_path / "self.yaml", {"extends": "self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        read_config(selfish)


def test_a_missing_base_is_refused_in_one_line(tmp_path):
    child = _write(tmp_path / "child.yaml", {"extends": "nope.yaml", "experiment": "c"})
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    assert str(exc.value) == (f"{child}: extends: base file {tmp_path / 'nope.yaml'} does not exist: fix the name "
                              f"(it is relative to the preset's folder {tmp_path})")


def test_extends_must_name_a_file(tmp_path):
    child = _write(tmp_path / "child.yaml", {"extends": ["a.yaml"], "experiment": "c"})
    with pytest.raises(ConfigError, match=r"extends: \['a.yaml'\] is not a file name: name the base"):
        read_config(child)


def _write_fingerprints() -> None:
    FINGERPRINTS.parent.mkdir(exist_ok=True)
    FINGERPRINTS.write_text(json.dumps({p.stem: fingerprint(p) for p in PRESETS}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    _write_fingerprints()
