"""A text-to-image distillation run (a tiny random Stable Diffusion pipeline, captioned digits)
killed after its first checkpoint and resumed ends bit-identical to the uninterrupted run: the
prompt draws, SiD-LSG's prompt dropout and guided fake-score training, the discrete timesteps and
SiDA's discriminator all replay. Bad text input is one line naming the fix."""

from __future__ import annotations

import copy
import signal

import pytest
import yaml

from helpers import REPO, assert_same_run, error_lines, run_module
from sd_assets import save_captioned_digits, save_tiny_sd_pipeline

RUN = "sida"


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    from sida.io import checkpoints
    from sida.io.diffusers_teacher import load_teacher

    d = tmp_path_factory.mktemp("text")
    folder = save_tiny_sd_pipeline(d / "teacher", "epsilon", digits=True)
    save_captioned_digits(d / "digits", count=32)
    checkpoints.save_network(d / "teacher.pt", load_teacher(folder))
    cfg = yaml.safe_load((REPO / "config" / "ci-sd.yaml").read_text())
    cfg["results_dir"] = str(d / "results")
    cfg["data"]["path"] = str(d / "digits")
    cfg["teacher"]["path"] = str(folder)
    cfg["distill"].update(dropout=0.1, snapshot_kimg=0.016, tick_kimg=0.016)
    cfg["distill"]["runs"] = {RUN: {"init": "teacher", "discriminator": True, "guidance_fake_train": 1.5,
                                    "guidance_fake": 1.5, "guidance_teacher": 1.5,
                                    "phases": [{"kind": "warmup", "kimg": 0.016}, {"kind": "sid", "kimg": 0.016},
                                               {"kind": "sida", "kimg": 0.032}]}}
    cfg["export"]["runs"] = []
    config = d / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"dir": d, "config": config, "cfg": cfg, "teacher": d / "teacher.pt"}


def _distill(setup, out, **env):
    return run_module("stages.distill", "--config", str(setup["config"]), "--run", RUN, "--teacher",
                      str(setup["teacher"]), "--out", str(out), timeout=600, **env)


def test_text_run_killed_and_resumed_is_bit_exact(text_setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = _distill(text_setup, a)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = _distill(text_setup, b, SIDA_KILL_AT="checkpointed:2")
    assert killed.returncode == -signal.SIGKILL and not (b / "network.pt").exists()
    resumed = _distill(text_setup, b)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_run(a, b, ["G", "G_ema", "fake"])


@pytest.mark.parametrize("case, words", [
    ("empty_prompts", "no prompt"),
    ("missing_image", "0003.png"),
])
def test_bad_text_data_is_one_line(text_setup, tmp_path, case, words):
    cfg = copy.deepcopy(text_setup["cfg"])
    cfg["results_dir"] = str(tmp_path / "results")
    if case == "empty_prompts":
        (tmp_path / "prompts.txt").write_text("\n\n")
        cfg["data"] = {**cfg["data"], "kind": "prompts", "prompts": str(tmp_path / "prompts.txt")}
        del cfg["data"]["path"], cfg["data"]["image_resolution"]
        cfg["distill"]["runs"][RUN]["discriminator"] = False
        cfg["distill"]["runs"][RUN]["phases"] = [{"kind": "sid", "kimg": 0.008}]
    else:
        digits = save_captioned_digits(tmp_path / "digits", count=8)
        (digits / "0003.png").unlink()
        cfg["data"]["path"] = str(digits)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = run_module("stages.distill", "--config", str(config), "--run", RUN, "--teacher", str(text_setup["teacher"]),
                   "--out", str(tmp_path / "out"))
    lines = error_lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1 and words in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
