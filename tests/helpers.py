"""Tiny configs, teachers and subprocess runners shared by the loop / stage tests.

Everything here is sized for a 2-core CPU shared with other jobs: an 8x8x1 digits SongUNet
with 8 channels, batches of 16 and runs of a few dozen iterations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def tiny_config(**distill_overrides) -> dict:
    """A raw (not yet validated) config: digits 8x8x1, 10 labels, a very small SongUNet."""
    cfg = {
        "experiment": "tiny",
        "seed": 3,
        "device": "cpu",
        "num_procs": 1,
        "threads": 1,
        "data": {"kind": "digits", "resolution": 8, "channels": 1, "label_dim": 10},
        "network": {
            "precond": "EDMPrecond",
            "model_type": "SongUNet",
            "kwargs": {"model_channels": 8, "channel_mult": [1, 2], "channel_mult_emb": 1, "num_blocks": 1,
                       "attn_resolutions": [], "dropout": 0.0, "embedding_type": "positional",
                       "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard",
                       "resample_filter": [1, 1]},
        },
        "teacher": {"kimg": 0.128, "batch": 16, "lr": 0.002, "lr_rampup_kimg": 0.032, "ema_halflife_kimg": 0.05,
                    "tick_kimg": 0.032, "snapshot_kimg": 0.032},
        "distill": {
            "batch": 16, "lr_g": 1.0e-4, "lr_fake": 1.0e-4, "ema_halflife_kimg": 0.05, "tick_kimg": 0.032,
            "snapshot_kimg": 0.032, "grid_size": 2,
            "runs": {
                "warmup": {"init": "teacher", "phases": [{"kind": "warmup", "kimg": 0.032}]},
                "sid": {"init": "warmup", "phases": [{"kind": "sid", "kimg": 0.064}]},
                # Every phase kind in one run that starts from the teacher: the resume test's run.
                "mixed": {"init": "teacher", "discriminator": True,
                          "phases": [{"kind": "warmup", "kimg": 0.032}, {"kind": "sid", "kimg": 0.032},
                                     {"kind": "sida", "kimg": 0.064}]},
            },
        },
        "wandb": {"mode": "disabled"},
    }
    cfg["distill"].update(distill_overrides)
    return cfg


def baseline_runs(iters: tuple[int, int] = (2, 6), batch: int = 16) -> dict:
    """A DMD2 and an ADD run for `tiny_config` (critic-only warm-up, then the method; `iters`
    iterations of `batch` each). DMD2 with its head, AdamW, lr warm-up, grad-norm clip, critic
    ratio 2 (a resume can land between generator turns) and no EMA; ADD with its heads on the
    teacher's encoder and R1. No augmentation (the baselines do not take it)."""
    def phases(kind: str) -> list[dict]:
        return [{"kind": "warmup", "kimg": iters[0] * batch / 1000}, {"kind": kind, "kimg": iters[1] * batch / 1000}]

    return {
        "dmd2": {"init": "teacher", "discriminator": "dmd2_head", "sigma_init": 80.0, "critic_ratio": 2,
                 "optimizer": "adamw", "beta1_g": 0.9, "beta1_fake": 0.9, "weight_decay": 0.01,
                 "lr_warmup_kimg": 4 * batch / 1000, "grad_clip": 10.0, "ema": False, "augment": 0.0,
                 "phases": phases("dmd2")},
        "add": {"init": "teacher", "discriminator": "add", "grad_clip": 1.0, "augment": 0.0, "eval_steps": [1, 4],
                "phases": phases("add")},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_teacher(path: Path, cfg: dict | None = None, seed: int = 0) -> Path:
    """An untrained teacher of the config's architecture in our network-file format."""
    import torch

    from sida.io import checkpoints
    from sida.run.config import validate
    from sida.nets.build import network_from_config

    import copy
    cfg = validate(copy.deepcopy(cfg or tiny_config()))
    torch.manual_seed(seed)
    net = network_from_config(cfg)
    checkpoints.save_network(path, net, meta={"stage": "test"})
    return path


# Variables that arm the stages' kill points (sida.io.killpoint) or their debug tracebacks: a
# stage a test starts never inherits them from the test's own environment.
HARNESS_VARS = ("SIDA_KILL_AT", "SIDA_KILL_SIGNAL", "SIDA_KILL_RANK", "SIDA_DEBUG")


def env(**extra: str) -> dict:
    """The environment of a stage a test runs: this checkout first on PYTHONPATH, W&B off, one
    thread, no torchrun variables, no kill point unless `extra` sets one."""
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
             PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *HARNESS_VARS):
        e.pop(k, None)
    e.update(extra)
    return e


def run_command(cmd: list[str], timeout: float = 300, preexec=None, **extra_env: str) -> subprocess.CompletedProcess:
    """`cmd` from the repo root in `env(**extra_env)`, output captured."""
    return subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def run_module(module: str, *args: str, timeout: float = 180, preexec=None, **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m <module> args...` from the repo root, output captured."""
    return run_command([PYTHON, "-m", module, *args], timeout=timeout, preexec=preexec, **extra_env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def run_metrics(path: Path) -> list[dict]:
    """A stage's metrics.jsonl without its wall-clock figures (rates, `time/*`), which differ
    between two runs that compute the same thing."""
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_sec" and "time/" not in k}
            for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path, state_keys: Sequence[str]) -> None:
    """Two stage out dirs hold the same result: every network file (weights and meta), the named
    networks of the checkpoint state.pt, every tick's metrics and the sample grid."""
    import torch

    from sida.io import checkpoints

    for name in ("network.pt", "last.pt"):
        if (a / name).exists() or (b / name).exists():
            na, nb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
            assert_state_dicts_equal(na["state_dict"], nb["state_dict"])
            assert json.loads(na["meta"]) == json.loads(nb["meta"])
    if state_keys:
        sa, sb = checkpoints.load_state(a / "state.pt"), checkpoints.load_state(b / "state.pt")
        for key in state_keys:
            assert_state_dicts_equal(sa[key]["state_dict"], sb[key]["state_dict"])
    assert run_metrics(a / "metrics.jsonl") == run_metrics(b / "metrics.jsonl")  # losses and monitor scores
    if (a / "samples.png").exists() or (b / "samples.png").exists():
        assert (a / "samples.png").read_bytes() == (b / "samples.png").read_bytes()


def randomise_weights(net, seed: int = 1, scale: float = 0.2):
    """Every parameter drawn from N(0, scale^2) (in place; returns `net`). Zero- or 1e-5-initialised
    output layers make many checks vacuous (every network outputs ~0): randomise them all."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def add_defaulted_keys(schema: dict) -> dict:
    """The schema with a defaulted key at every kind of place: top level, a new section, each
    section, nested objects, a `distill` setting (which runs may set), a run's own key, a fetch
    asset and a rule's resources."""
    props = schema["properties"]
    props["new_top"] = {"type": "integer", "default": 3}
    props["new_section"] = {"type": "object", "default": {}, "properties": {"knob": {"type": "number", "default": 0.5}}}
    for section in ("data", "network", "teacher", "distill", "evaluate", "fetch", "latent", "wandb", "slurm"):
        props[section]["properties"]["new_knob"] = {"type": "boolean", "default": True}
    props["evaluate"]["properties"]["during_training"]["properties"]["new_knob"] = {"type": "integer", "default": 7}
    props["distill"]["properties"]["add_features"]["properties"]["new_knob"] = {"type": "string", "default": "x"}
    props["fetch"]["properties"]["assets"]["items"]["properties"]["mirror"] = {"type": ["string", "null"], "default": None}
    props["resources"]["additionalProperties"]["properties"]["new_knob"] = {"type": "integer", "default": 1}
    run = schema["definitions"]["run"]["properties"]
    run["new_knob"] = {"$ref": "#/properties/distill/properties/new_knob"}
    run["new_run_key"] = {"type": "boolean", "default": False}
    return schema


# The authors' code (github.com/mingyuanzhou/SiD at bench.authors.AUTHORS_COMMIT) is never in this
# repository; tests that run it look for a checkout here and are skipped without one.
AUTHORS_REPO = Path(os.environ.get("SIDA_AUTHORS_REPO", "/work/exp/authors/SiD"))


def needs_authors(fn):
    import pytest

    return pytest.mark.skipif(not (AUTHORS_REPO / "sida_training").is_dir(),
                              reason=f"no checkout of the authors' code at {AUTHORS_REPO} (SIDA_AUTHORS_REPO)")(fn)
