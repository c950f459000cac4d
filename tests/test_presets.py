"""Config presets: every `config/*.yaml` validates, the paper presets carry the papers' numbers,
and bad configs are rejected up front with the offending key path in a one-line message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sida.run.config import load_config, validate
from sida.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))

# Per-dataset settings of the SiDA paper (arXiv 2410.14919) Table 8 and the SiD paper (arXiv
# 2404.04057) hyperparameter table, as implemented by the authors' launch scripts
# (github.com/mingyuanzhou/SiD, branch sida: run_sida.sh, run_sid_sida.sh, sida_train.py):
#   batch, per-GPU batch, lr (generator = fake score), EMA half-life (kimg = Mimg x 1000), fp16,
#   fake-score dropout; teacher architecture from the NVlabs/edm README training table.
PAPER = {
    #                  batch  per-GPU  lr      ema_kimg  fp16   dropout  label_dim  model         channel_mult
    "cifar10-uncond":  (256,  32,      1e-5,   500,      False, 0.13,    0,         "SongUNet",   [2, 2, 2]),
    "cifar10-cond":    (256,  32,      1e-5,   500,      False, 0.13,    10,        "SongUNet",   [2, 2, 2]),
    "imagenet64-cond": (8192, 32,      4e-6,   2000,     True,  0.10,    1000,      "DhariwalUNet", [1, 2, 3, 4]),
    "ffhq64":          (512,  64,      1e-5,   500,      True,  0.05,    0,         "SongUNet",   [1, 2, 2, 2]),
    "afhqv2-64":       (512,  64,      5e-6,   500,      True,  0.05,    0,         "SongUNet",   [1, 2, 2, 2]),
}
TEACHERS = {
    "cifar10-uncond": "edm-cifar10-32x32-uncond-vp.pkl",
    "cifar10-cond": "edm-cifar10-32x32-cond-vp.pkl",
    "imagenet64-cond": "edm-imagenet-64x64-cond-adm.pkl",
    "ffhq64": "edm-ffhq-64x64-uncond-vp.pkl",
    "afhqv2-64": "edm-afhqv2-64x64-uncond-vp.pkl",
}
# EDM teacher dropout (NVlabs/edm README): CIFAR-10 0.13 (train.py default), FFHQ 0.05, AFHQv2 0.25,
# ImageNet 0.10.
TEACHER_DROPOUT = {"cifar10-uncond": 0.13, "cifar10-cond": 0.13, "imagenet64-cond": 0.10,
                   "ffhq64": 0.05, "afhqv2-64": 0.25}


def _load(name: str) -> dict:
    return load_config(CONFIG_DIR / f"{name}.yaml")


# --- every preset loads -----------------------------------------------------------------------

def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"config", "digits-long", *PAPER} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_with_defaults_filled(path):
    cfg = load_config(path)
    # defaults filled at every level, including inside runs
    for section in ("data", "network", "teacher", "distill", "evaluate", "fetch", "wandb"):
        assert isinstance(cfg[section], dict), section
    assert "P_mean" in cfg["distill"] and "fake_clip" in cfg["distill"]
    for run in cfg["distill"]["runs"].values():
        assert {"init", "init_generator", "discriminator", "phases", "evaluate"} <= set(run)
    # the experiment name matches the file (outputs go to results/<experiment>/)
    if path.stem in PAPER or path.stem == "digits-long":
        assert cfg["experiment"] == path.stem
    # the file opens with a comment header saying where its settings come from
    assert path.read_text().lstrip().startswith("#")


def test_digits_long_is_a_longer_embedded_preset():
    base, long = load_config(CONFIG_DIR / "config.yaml"), _load("digits-long")
    assert long["device"] == "cpu" and long["data"]["kind"] == "digits" and long["teacher"]["source"] == "train"
    assert long["network"] == base["network"] and long["data"] == base["data"]
    assert long["teacher"]["kimg"] >= 180

    def total(cfg, run):
        return sum(p["kimg"] for p in cfg["distill"]["runs"][run]["phases"])

    for run in ("sid", "sida", "sid2a"):
        assert 2.0 <= total(long, run) / total(base, run) <= 3.5, run
    assert long["evaluate"].get("num_samples", 0) > base["evaluate"].get("num_samples", 0)


def test_evaluation_labels_and_training_seeds_by_preset():
    """Embedded presets: balanced labels (the FD's spread in a digit classifier's features comes
    from class proportions otherwise); the long one trains every run from >= 3 seeds. Paper
    presets keep the published protocol: one random label per seed, one training."""
    for name in ("config", "digits-long", "ci-short"):
        assert load_config(CONFIG_DIR / f"{name}.yaml")["evaluate"]["labels"] == "balanced", name
    long = _load("digits-long")
    assert len(long["seeds"]) >= 3 and long["evaluate"]["during_training"]["every_kimg"] > 0
    assert load_config(CONFIG_DIR / "config.yaml")["seeds"] is None
    for name in PAPER:
        cfg = _load(name)
        assert cfg["evaluate"]["labels"] == "random" and cfg["seeds"] is None, name


# --- the paper presets carry the papers' numbers ----------------------------------------------

@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_values(name):
    batch, per_gpu, lr, ema_kimg, fp16, dropout, label_dim, model, cmult = PAPER[name]
    cfg = _load(name)
    d, net = cfg["distill"], cfg["network"]
    assert (d["batch"], d["batch_per_proc"]) == (batch, per_gpu)
    assert d["batch"] % (d["batch_per_proc"] * cfg["num_procs"] * cfg["nodes"]) == 0
    assert d["lr_g"] == pytest.approx(lr) and d["lr_fake"] == pytest.approx(lr)
    assert d["ema_halflife_kimg"] == ema_kimg
    assert d["precision"] == ("fp16" if fp16 else "fp32")
    assert net["use_fp16"] is fp16
    assert d["adam_eps"] == pytest.approx(1e-6 if fp16 else 1e-8)
    assert d["dropout"] == pytest.approx(dropout)
    # shared settings of both papers
    assert (d["sigma_init"], d["tmax"], d["lambda_sid"], d["lambda_adv"]) == (2.5, 800, 100, 0.01)
    assert d.get("lambda_d", 1.0) == 1.0 and d["fake_clip"] == 1.0 and d["ema_rampup_ratio"] == 0.05
    assert d["alpha"] in (1.0, 1.2)
    # teacher: published EDM network (EDMPrecond, config F) with EDM's architecture
    assert cfg["teacher"]["source"] == "fetch"
    assert net["precond"] == "EDMPrecond" and net["model_type"] == model
    assert net["kwargs"]["channel_mult"] == cmult
    assert net["kwargs"]["dropout"] == pytest.approx(TEACHER_DROPOUT[name])
    assert net["kwargs"]["augment_dim"] == (0 if model == "DhariwalUNet" else 9)
    assert cfg["data"]["kind"] == "edm_zip" and cfg["data"]["label_dim"] == label_dim
    assert cfg["data"]["resolution"] == (32 if name.startswith("cifar") else 64)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_schedule(name):
    runs = _load(name)["distill"]["runs"]
    assert set(runs) == {"sid", "sida", "sid2a"}
    assert [p["kind"] for p in runs["sid"]["phases"]] == ["sid"]
    for run in ("sida", "sid2a"):
        phases = runs[run]["phases"]
        # 100k images warm-up, 100k SiD, then SiDA (sida_training_loop.py)
        assert [(p["kind"], p["kimg"]) for p in phases[:2]] == [("warmup", 100), ("sid", 100)]
        assert phases[2]["kind"] == "sida" and phases[2]["kimg"] >= 10_000  # tens of Mimg or more
        assert runs[run]["discriminator"] is True
    assert runs["sid2a"]["init_generator"] == "sid"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_assets(name):
    cfg = _load(name)
    assets = {a["name"]: a for a in cfg["fetch"]["assets"]}
    assert assets["teacher"]["url"] == f"https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/{TEACHERS[name]}"
    ref = {"cifar10-uncond": "cifar10-32x32", "cifar10-cond": "cifar10-32x32", "imagenet64-cond": "imagenet-64x64",
           "ffhq64": "ffhq-64x64", "afhqv2-64": "afhqv2-64x64"}[name]
    assert assets["fid_ref"]["url"] == f"https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/{ref}.npz"
    # the TorchScript export of EDM fid.py's Inception-v3 (what sida/eval/features.py loads)
    assert assets["inception"]["url"].endswith("/metrics/inception-2015-12-05.pt")
    assert assets["dataset"]["path"].endswith(".zip") and not assets["dataset"].get("url")
    ev = cfg["evaluate"]
    assert ev["num_samples"] == 50000 and ev["num_runs"] == 10
    assert ev["extractor"] == "inception" and ev["inception_mode"] == "legacy_tensorflow"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_assets_pass_the_fetch_checks(name):
    fetch = pytest.importorskip("stages.fetch")
    kinds = {a["name"]: a["kind"] for a in fetch.check_assets(_load(name)["fetch"])}
    assert kinds == {"teacher": "teacher", "fid_ref": "refstats", "inception": "inception", "dataset": "dataset"}


# --- bad configs are rejected before any work, naming the key -----------------------------------

@pytest.fixture
def base() -> dict:
    return yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())


def _reject(cfg: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as exc:
        validate(copy.deepcopy(cfg), source="bad.yaml")
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_base_is_valid(base):
    validate(copy.deepcopy(base))


def test_wrong_type(base):
    base["distill"]["batch"] = "big"
    _reject(base, "distill.batch", "'big'")


def test_unknown_key(base):
    base["distill"]["bacth"] = 64
    _reject(base, "distill", "bacth")


def test_unknown_top_level_key(base):
    base["distil"] = {}
    _reject(base, "distil")


def test_negative_lr(base):
    base["distill"]["lr_g"] = -1e-4
    _reject(base, "distill.lr_g")


def test_negative_run_lr(base):
    base["distill"]["runs"]["sida"]["lr_fake"] = -3e-4
    _reject(base, "distill.runs.sida.lr_fake")


def test_phase_kimg_zero(base):
    base["distill"]["runs"]["sid"]["phases"][0]["kimg"] = 0
    _reject(base, "distill.runs.sid.phases.0.kimg")


def test_unknown_phase_kind(base):
    base["distill"]["runs"]["sid"]["phases"][0]["kind"] = "gan"
    _reject(base, "distill.runs.sid.phases.0.kind")


def test_init_names_missing_run(base):
    base["distill"]["runs"]["sid"]["init"] = "warmpu"
    _reject(base, "distill.runs.sid.init", "warmpu")


def test_init_generator_names_missing_run(base):
    base["distill"]["runs"]["sid2a"]["init_generator"] = "sdi"
    _reject(base, "distill.runs.sid2a.init_generator", "sdi")


def test_run_cycle(base):
    base["distill"]["runs"]["warmup"]["init"] = "sid2a"  # warmup -> sid2a -> sid -> warmup
    _reject(base, "distill.runs", "cycle")


def test_batch_not_divisible(base):
    base["num_procs"] = 2
    base["distill"]["batch_per_proc"] = 24  # 64 % (24 x 2) != 0; the teacher's 128 % 2 == 0
    _reject(base, "distill.batch_per_proc")


def test_batch_not_divisible_by_procs(base):
    base["num_procs"] = 3  # teacher batch 128 % 3 != 0
    _reject(base, "teacher.batch")


def test_sida_phase_without_discriminator(base):
    base["distill"]["runs"]["sida"]["discriminator"] = False
    _reject(base, "distill.runs.sida", "discriminator")


def test_paper_preset_override_rejected():
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIG_DIR / "cifar10-uncond.yaml", ["distill.batch_per_proc=48"])
    assert "distill.batch_per_proc" in str(exc.value) and "\n" not in str(exc.value)


# --- unreadable files: one line, no traceback material -----------------------------------------

def test_not_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\ndistill: {batch: [64\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert "\n" not in msg and str(bad) in msg and "YAML" in msg


def test_not_a_mapping_is_one_line(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "\n" not in str(exc.value) and str(bad) in str(exc.value)


def test_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    msg = str(exc.value)
    assert "\n" not in msg and str(missing) in msg
