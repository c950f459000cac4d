"""Config presets: every `config/*.yaml` validates, the paper presets carry the papers' numbers,
and bad configs are rejected up front with the offending key path in a one-line message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sida.run.config import load_config, run_config, validate
from sida.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))

# Network architecture per preset (NVlabs/edm README training table): label_dim, model, channel_mult.
PAPER = {
    "cifar10-uncond":  (0,    "SongUNet",     [2, 2, 2]),
    "cifar10-cond":    (10,   "SongUNet",     [2, 2, 2]),
    "imagenet64-cond": (1000, "DhariwalUNet", [1, 2, 3, 4]),
    "ffhq64":          (0,    "SongUNet",     [1, 2, 2, 2]),
    "afhqv2-64":       (0,    "SongUNet",     [1, 2, 2, 2]),
}

# The authors' launch scripts, github.com/mingyuanzhou/SiD branch `sida`: run `sid` = run_sid.sh,
# `sida` = run_sida.sh, `sid2a` = run_sid_sida.sh, each under its dataset's `if` block; where a
# script passes nothing, the click defaults of sid_train.py / sida_train.py (--dropout 0.13,
# --augment 0.12, --ema 0.5, --g_beta1 0). Last column: the image count (kimg) in the file name of
# the released checkpoint of that run (the duration behind the reported FID).
#   (batch, --batch-gpu, --lr (fake score), --glr, --alpha, --fp16, --dropout, --augment, --ema Mimg,
#    --g_beta1, released kimg)
OFFICIAL = {
    "cifar10-uncond": {"sid":   (256, 16, 1e-5, 1e-5, 1.2, 0, 0.13, 0.12, 0.5, 0.0, 403968),
                       "sida":  (256, 32, 1e-5, 1e-5, 1.0, 0, 0.13, 0.12, 0.5, 0.0, 217920),
                       "sid2a": (256, 32, 1e-5, 1e-5, 1.0, 0, 0.13, 0.12, 0.5, 0.0, 28160)},
    "cifar10-cond":   {"sid":   (256, 16, 1e-5, 1e-5, 1.2, 0, 0.13, 0.12, 0.5, 0.0, 713312),
                       "sida":  (256, 32, 1e-5, 1e-5, 1.0, 0, 0.13, 0.12, 0.5, 0.0, 293184),
                       "sid2a": (256, 32, 1e-5, 1e-5, 1.0, 0, 0.13, 0.12, 0.5, 0.0, 38912)},
    "imagenet64-cond": {"sid":   (8192, 16, 4e-6, 4e-6, 1.2, 1, 0.1, 0.0, 2.0, 0.0, 939176),
                        "sida":  (8192, 32, 4e-6, 4e-6, 1.0, 1, 0.1, 0.0, 2.0, 0.0, 249167),
                        "sid2a": (8192, 32, 4e-6, 4e-6, 1.0, 1, 0.1, 0.0, 2.0, 0.0, 29499)},
    "ffhq64":         {"sid":   (512, 32, 1e-5, 1e-5, 1.2, 1, 0.05, 0.15, 0.5, 0.9, 498176),
                       "sida":  (512, 64, 1e-5, 1e-5, 1.0, 1, 0.05, 0.15, 0.5, 0.0, 185856),
                       "sid2a": (512, 64, 1e-5, 1e-5, 1.0, 1, 0.05, 0.15, 0.5, 0.0, 168960)},
    "afhqv2-64":      {"sid":   (512, 32, 5e-6, 5e-6, 1.0, 1, 0.05, 0.15, 0.5, 0.0, 371712),
                       "sida":  (512, 64, 5e-6, 5e-6, 1.0, 1, 0.05, 0.15, 0.5, 0.0, 127488),
                       "sid2a": (512, 64, 5e-6, 5e-6, 1.0, 1, 0.05, 0.15, 0.5, 0.0, 175104)},
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


def test_weak_teacher_presets_change_only_the_teacher_length():
    """The imperfect-teacher experiment is the default with one stated change (teacher.kimg 40
    instead of 200), 3 training seeds and added runs; the default's runs are kept as they are (the
    long variant only lengthens sid and sida's last phase)."""
    base = load_config(CONFIG_DIR / "config.yaml")
    for name in ("digits-weak-teacher", "digits-weak-teacher-long"):
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg["experiment"] == name and cfg["seeds"] == [0, 1, 2]
        assert cfg["teacher"] == {**base["teacher"], "kimg": 40}, name
        for key in ("data", "network", "evaluate", "threads", "resources"):
            assert cfg[key] == base[key], (name, key)
        assert {k: v for k, v in cfg["distill"].items() if k != "runs"} == \
            {k: v for k, v in base["distill"].items() if k != "runs"}
    weak = load_config(CONFIG_DIR / "digits-weak-teacher.yaml")
    for run, spec in base["distill"]["runs"].items():
        assert weak["distill"]["runs"][run] == spec, run
    long = load_config(CONFIG_DIR / "digits-weak-teacher-long.yaml")
    for run in ("sid", "sida"):
        b, l = base["distill"]["runs"][run], long["distill"]["runs"][run]
        assert {k: v for k, v in l.items() if k != "phases"} == {k: v for k, v in b.items() if k != "phases"}
        assert [p["kind"] for p in l["phases"]] == [p["kind"] for p in b["phases"]]
        assert sum(p["kimg"] for p in l["phases"]) == 30


def test_evaluation_labels_and_training_seeds_by_preset():
    """Embedded presets: balanced labels (the FD's spread in a digit classifier's features comes
    from class proportions otherwise); the long one trains every run from >= 3 seeds. Paper
    presets keep the published protocol: one random label per seed, one training."""
    for name in ("config", "digits-long", "ci-short"):
        assert load_config(CONFIG_DIR / f"{name}.yaml")["evaluate"]["labels"] == "balanced", name
    # and randomized-QMC noise where the spread is reported against a 5 % target
    for name in ("config", "digits-long"):
        assert load_config(CONFIG_DIR / f"{name}.yaml")["evaluate"]["latents"] == "sobol", name
    long = _load("digits-long")
    assert len(long["seeds"]) >= 3 and long["evaluate"]["during_training"]["every_kimg"] > 0
    assert load_config(CONFIG_DIR / "config.yaml")["seeds"] is None
    for name in PAPER:
        cfg = _load(name)
        assert cfg["evaluate"]["labels"] == "random" and cfg["seeds"] is None, name
        assert cfg["evaluate"]["latents"] == "iid", name  # EDM's per-seed noise, as published


# --- the paper presets carry the papers' numbers ----------------------------------------------

@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_network(name):
    label_dim, model, cmult = PAPER[name]
    cfg = _load(name)
    net = cfg["network"]
    assert cfg["teacher"]["source"] == "fetch"
    # teacher: published EDM network (EDMPrecond, config F) with EDM's architecture
    assert net["precond"] == "EDMPrecond" and net["model_type"] == model
    assert net["kwargs"]["channel_mult"] == cmult
    assert net["kwargs"]["dropout"] == pytest.approx(TEACHER_DROPOUT[name])
    assert net["kwargs"]["augment_dim"] == (0 if model == "DhariwalUNet" else 9)
    assert cfg["data"]["kind"] == "edm_zip" and cfg["data"]["label_dim"] == label_dim
    assert cfg["data"]["resolution"] == (32 if name.startswith("cifar") else 64)
    assert cfg["num_procs"] * cfg["nodes"] == 4  # --nproc_per_node=4 in every script


@pytest.mark.parametrize("name,run", [(n, r) for n in sorted(OFFICIAL) for r in ("sid", "sida", "sid2a")])
def test_paper_preset_run_is_the_launch_script(name, run):
    """Every setting of every run against the authors' script for it (see OFFICIAL)."""
    batch, per_gpu, lr, glr, alpha, fp16, dropout, augment, ema, beta1, released = OFFICIAL[name][run]
    cfg = _load(name)
    rc = run_config(cfg, run)
    assert (rc["batch"], rc["batch_per_proc"]) == (batch, per_gpu)
    assert rc["lr_fake"] == pytest.approx(lr) and rc["lr_g"] == pytest.approx(glr)
    assert rc["alpha"] == pytest.approx(alpha)
    assert rc["precision"] == ("fp16" if fp16 else "fp32")
    assert rc["adam_eps"] == pytest.approx(1e-6 if fp16 else 1e-8)  # sid_train.py / sida_train.py
    assert rc["dropout"] == pytest.approx(dropout) and rc["augment"] == pytest.approx(augment)
    assert rc["ema_halflife_kimg"] == pytest.approx(ema * 1000) and rc["ema_rampup_ratio"] == 0.05
    assert rc["beta1_g"] == pytest.approx(beta1)
    # shared: --tmax 800 --init_sigma 2.5 --lsg 100 --lsd 1 --lsg_gan 0.01, loss defaults
    assert (rc["sigma_init"], rc["tmax"], rc["lambda_sid"], rc["lambda_d"], rc["lambda_adv"]) == (2.5, 800, 100, 1, 0.01)
    assert (rc["P_mean"], rc["P_std"], rc["fake_clip"]) == (-1.2, 1.2, 1.0)
    # the run ends at the released checkpoint's image count (rounded up to whole iterations)
    total = sum(p["kimg"] for p in rc["phases"])
    assert released <= total < released + 1, total
    if augment:
        assert cfg["network"]["kwargs"]["augment_dim"] == 9  # the pipe feeds 9 labels
    # what the run is: SiD data-free from the teacher; SiDA / SiD2A train the discriminator, G
    # frozen for 100k images, SiD loss alone up to 200k (sida_training_loop.py)
    assert rc["init"] == "teacher"
    if run == "sid":
        assert not rc["discriminator"] and rc["init_generator"] is None
        assert [p["kind"] for p in rc["phases"]] == ["sid"]
    else:
        assert rc["discriminator"] is True
        assert [(p["kind"], p["kimg"]) for p in rc["phases"][:2]] == [("warmup", 100), ("sid", 100)]
        assert [p["kind"] for p in rc["phases"]] == ["warmup", "sid", "sida"]
        assert rc["init_generator"] == ("sid" if run == "sid2a" else None)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_header_names_the_script_lines(name):
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    header = text[:text.index("experiment:")]
    assert "mingyuanzhou/SiD" in header and "`sida`" in header
    for script in ("run_sid.sh L", "run_sida.sh L", "run_sid_sida.sh L"):
        assert script in header, script
    for kimg in (v[-1] for v in OFFICIAL[name].values()):
        assert str(kimg) in header


def test_run_schema_accepts_every_distill_setting():
    """A run may set any `distill` key, validated by that key's own rule ($ref, no default)."""
    from sida.run.config import RUN_ONLY_KEYS, load_schema

    schema = load_schema()
    settings = set(schema["properties"]["distill"]["properties"]) - {"runs"}
    run_props = schema["definitions"]["run"]["properties"]
    assert settings == set(run_props) - set(RUN_ONLY_KEYS)
    for key in settings:
        assert run_props[key] == {"$ref": f"#/properties/distill/properties/{key}"}, key


def test_schema_method_table_matches_the_method_classes_and_the_enums():
    """`x-methods` (what sida.run.config checks runs against) names each method class of
    sida/train/methods once, every phase kind but `warmup` once, and only discriminators the
    schema accepts; a phase that needs a discriminator belongs to a method that may train it."""
    from sida.run.config import load_schema, methods_table
    from sida.train.methods import METHODS

    schema = load_schema()
    table = methods_table()
    assert set(table) == set(METHODS)
    phases = [kind for m in table.values() for kind in m["phases"]]
    assert sorted(phases + ["warmup"]) == sorted(schema["definitions"]["phase"]["properties"]["kind"]["enum"])
    accepted = set(schema["definitions"]["run"]["properties"]["discriminator"]["enum"])
    for name, m in table.items():
        assert "none" in m["discriminators"] and set(m["discriminators"]) <= accepted, name
        for kind, needed in m["needs"].items():
            assert kind in m["phases"] and needed in m["discriminators"], (name, kind)


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
    assets = pytest.importorskip("sida.io.assets")
    kinds = {a["name"]: a["kind"] for a in assets.check_assets(_load(name)["fetch"])}
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


def test_per_run_setting_wrong_type_or_range(base):
    base["distill"]["runs"]["sid"]["alpha"] = "big"
    _reject(base, "distill.runs.sid.alpha")
    base["distill"]["runs"]["sid"]["alpha"] = 1.0
    base["distill"]["runs"]["sida"]["augment"] = 1.5
    _reject(base, "distill.runs.sida.augment")
    base["distill"]["runs"]["sida"]["augment"] = 0.1
    base["distill"]["runs"]["sida"]["beta1_g"] = 1.0  # Adam needs beta1 < 1
    _reject(base, "distill.runs.sida.beta1_g")


def test_per_run_unknown_key(base):
    base["distill"]["runs"]["sid"]["alhpa"] = 1.0
    _reject(base, "distill.runs.sid", "alhpa")


def test_per_run_batch_not_divisible(base):
    base["num_procs"] = 2
    base["distill"]["runs"]["sid"]["batch_per_proc"] = 24  # 64 % (24 x 2) != 0
    _reject(base, "distill.runs.sid.batch_per_proc")


def test_run_config_merges_any_setting_per_run(base):
    base["distill"].update(alpha=1.2, dropout=0.1, precision="fp16")
    runs = base["distill"]["runs"]
    runs["sid"].update(alpha=1.0, augment=0.0, beta1_g=0.9, batch_per_proc=16)
    runs["sida"].update(dropout=None, adam_eps=1e-7)  # an explicit null overrides too
    cfg = validate(copy.deepcopy(base))
    sid, sida, sid2a = (run_config(cfg, r) for r in ("sid", "sida", "sid2a"))
    assert (sid["alpha"], sid["beta1_g"], sid["batch_per_proc"]) == (1.0, 0.9, 16)
    assert (sida["alpha"], sida["beta1_g"], sida["batch_per_proc"]) == (1.2, 0.0, None)
    assert sid["dropout"] == 0.1 and sida["dropout"] is None and sid2a["dropout"] == 0.1
    assert sida["lr_fake"] == 3.0e-4 and sid["lr_fake"] == 1.0e-4  # the embedded default's per-run lr
    # adam_eps: null -> 1e-6 with fp16 (the official rule), an explicit value stays
    assert sid["adam_eps"] == 1e-6 and sida["adam_eps"] == 1e-7
    assert "runs" not in sid and sid["phases"] == runs["sid"]["phases"]
    # the section itself keeps its values: a run's setting is its own
    assert cfg["distill"]["alpha"] == 1.2 and "beta1_g" not in cfg["distill"]["runs"]["sida"]


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
    base["resources"] = {}  # (the default gives its teacher 2 processes of its own)
    _reject(base, "teacher.batch")


def test_batch_not_divisible_by_a_rules_own_procs(base):
    base["resources"] = {"teacher": {"procs": 3}}  # the teacher's own process count: 128 % 3 != 0
    _reject(base, "teacher.batch", "3 processes")
    base["resources"] = {"teacher": {"procs": 2}, "distill": {"procs": 3}}  # 128 % 2 == 0, 64 % 3 != 0
    _reject(base, "distill.batch", "3 processes")
    base["resources"] = {"teacher": {"procs": 2}}  # 2 divides both
    validate(copy.deepcopy(base))


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


# --- the baselines' presets ----------------------------------------------------------------------

# DMD2's published ImageNet-64 settings (github.com/tianweiy/DMD2: the three experiments/imagenet
# scripts, main/edm/train_edm.py defaults, experiments/imagenet/README.md): run -> (lr, GAN,
# iterations of the released checkpoint, init).
DMD2_IMAGENET = {"dmd2": (2e-6, True, 193500, "teacher"), "dmd": (2e-6, False, 405500, "teacher"),
                 "dmd2_resume": (5e-7, True, 140000, "dmd")}


@pytest.mark.parametrize("run", sorted(DMD2_IMAGENET))
def test_dmd2_imagenet64_is_the_published_recipe(run):
    lr, gan, iters, init = DMD2_IMAGENET[run]
    cfg = _load("dmd2-imagenet64")
    rc = run_config(cfg, run)
    assert cfg["num_procs"] * cfg["nodes"] == 7 and rc["batch"] == 7 * 40 and cfg["seed"] == 10
    assert rc["lr_g"] == rc["lr_fake"] == pytest.approx(lr) and rc["init"] == init
    assert (rc["optimizer"], rc["beta1_g"], rc["beta1_fake"], rc["beta2"], rc["weight_decay"], rc["adam_eps"]) == \
        ("adamw", 0.9, 0.9, 0.999, 0.01, 1e-8)
    assert rc["critic_ratio"] == 5 and rc["grad_clip"] == 10 and rc["ema"] is False
    assert rc["sigma_init"] == 80 and rc["dm_index_range"] == [20, 980] and rc["precision"] == "bf16"
    assert rc["lr_warmup_kimg"] == pytest.approx(500 / 7 * 280 / 1000) and rc["dropout"] == 0.0
    assert rc["discriminator"] == ("dmd2_head" if gan else False)
    assert [p["kind"] for p in rc["phases"]] == ["dmd2" if gan else "dmd"]
    assert sum(p["kimg"] for p in rc["phases"]) == pytest.approx(iters * 280 / 1000)
    if gan:
        assert (rc["lambda_gan"], rc["lambda_cls"]) == (0.003, 0.01)
    net = cfg["network"]
    assert net["model_type"] == "DhariwalUNet" and net["kwargs"]["channel_mult"] == [1, 2, 3, 4]
    header = (CONFIG_DIR / "dmd2-imagenet64.yaml").read_text().split("experiment:")[0]
    assert "tianweiy/DMD2" in header and "ours" not in header.replace("nothing here is ours", "")


@pytest.mark.parametrize("name", ["dmd2-cifar10", "add-cifar10", "add-imagenet64"])
def test_baseline_presets_with_our_settings_say_so(name):
    cfg = _load(name)
    header = (CONFIG_DIR / f"{name}.yaml").read_text().split("experiment:")[0]
    assert "OURS" in header and "# ours" in (CONFIG_DIR / f"{name}.yaml").read_text()
    assert cfg["teacher"]["source"] == "fetch" and cfg["evaluate"]["num_samples"] == 50000
    (run,) = cfg["distill"]["runs"]
    rc = run_config(cfg, run)
    if name.startswith("add"):
        # ADD's method: the paper's weights and levels, DINOv2 ViT-S/14 from the fetch stage
        assert rc["discriminator"] == "add" and rc["eval_steps"] == [1, 4]
        assert (rc["lambda_distill"], rc["r1_gamma"], rc["add_weighting"]) == (2.5, 1e-5, "alpha_bar")
        assert rc["add_student_steps"] == [999, 749, 499, 249] and rc["add_features"]["kind"] == "dinov2"
        assert rc["add_features"]["arch"] == "vits14" and rc["add_features"]["weights"] is None
        assets = pytest.importorskip("sida.io.assets")
        kinds = {a["name"]: (a["kind"], a.get("arch")) for a in assets.check_assets(cfg["fetch"])}
        assert kinds["dinov2_vits14"] == ("dinov2", "vits14")
    else:
        assert rc["discriminator"] == "dmd2_head" and rc["sigma_init"] == 80 and rc["critic_ratio"] == 5
