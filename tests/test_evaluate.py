"""The evaluate stage end to end, its one-line errors, the training monitor and the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "config" / "config.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sida.io.checkpoints import save_network
    from sida.nets.precond import EDMPrecond

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    save_network(root / "net.pt", net)
    sets = [f"results_dir={root / 'results'}", "evaluate.num_runs=2", "evaluate.num_samples=60",
            "evaluate.batch=64", "evaluate.classifier.epochs=3", "evaluate.pr_max_samples=64",
            "evaluate.labels=balanced", "evaluate.during_training.num_samples=100"]
    return root, sets


def _args(sets):
    return [a for s in sets for a in ("--set", s)]


def _run(args, cwd=REPO):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "stages.evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def _assert_one_error_line(proc, *words):
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("[evaluate]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_evaluate_generator_end_to_end(setup):
    root, sets = setup
    out = root / "g" / "metrics.json"
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "g",
                 "--out", str(out), "--train-seed", "3", *_args(sets)])
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out.read_text())
    assert m["metric"] == "fd" and m["metric_label"] == "FD (digits classifier)" and m["nfe"] == 1
    assert m["seeds"] == [[0, 59], [60, 119]] and len(m["runs"]) == 2 and m["train_seed"] == 3
    assert len(m["extractor"]["sha256"]) == 64 and len(m["reference"]["sha256"]) == 64
    for k in ("fd", "is", "precision", "recall"):
        s = m["summary"][k]
        assert set(s) == {"mean", "std", "se", "n", "values"} and len(s["values"]) == 2 and s["n"] == 2
        assert s["se"] == pytest.approx(abs(s["values"][0] - s["values"][1]) / 2)  # std/sqrt(2) for 2 runs
    # Balanced labels: equal class counts in every run, compared with class-balanced real images
    # (the digits' rarest class has 174 images).
    assert m["labels"] == "balanced" and all(r["class_counts"] == [6] * 10 for r in m["runs"])
    assert m["reference"]["class_counts"] == [174] * 10 and m["reference"]["num_images"] == 1740
    # The FD at the training monitor's sample count (100), from the evaluation's first seeds (they
    # span both runs here), for the report's curves.
    assert m["monitor"]["num_samples"] == 100 and m["monitor"]["seeds"] == [0, 99] and np.isfinite(m["monitor"]["fd"])
    # The grid: grid_size (8) columns, one row per class, cells enlarged 6x with 2-pixel gaps.
    from PIL import Image

    assert Image.open(root / "g" / "samples.png").size == (8 * 48 + 7 * 2, 10 * 48 + 9 * 2)
    # Same seeds, same numbers: rerun in process (reference and classifier now cached).
    from stages.evaluate import main

    out2 = root / "g2" / "metrics.json"
    main(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "g",
          "--out", str(out2), *_args(sets)])
    m2 = json.loads(out2.read_text())
    assert m2["summary"]["fd"]["values"] == pytest.approx(m["summary"]["fd"]["values"], rel=1e-5)
    assert m2["train_seed"] is None


def test_random_labels_and_the_monitor_protocol(setup):
    from stages.evaluate import main

    root, sets = setup
    out = root / "r" / "metrics.json"
    main(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "r",
          "--out", str(out), *_args(sets + ["evaluate.labels=random", "evaluate.num_runs=1", "evaluate.num_samples=64",
                                             "evaluate.precision_recall=false", "evaluate.during_training.every_kimg=0"])])
    m = json.loads(out.read_text())
    counts = m["runs"][0]["class_counts"]
    assert m["labels"] == "random" and sum(counts) == 64 and len(set(counts)) > 1
    assert m["reference"]["num_images"] == 1797  # every real image: random labels follow no balance
    assert m["summary"]["fd"]["se"] is None and m["summary"]["fd"]["std"] == 0.0  # one run: no error estimate
    assert m["monitor"] is None  # no training monitor, no monitor-protocol value


def test_extra_extractor_scores_the_same_samples(setup, tmp_path):
    """FID + FD-DINOv2 as EDM2 reports them: one sampling pass, every feature network scored on
    the same images, each against its own reference; the extra value equals an evaluation with
    that network as the main one (random ViT-S/14 weights of the real architecture)."""
    from sida.eval.features import save_random_dinov2
    from stages.evaluate import main

    root, sets = setup
    weights = save_random_dinov2(tmp_path / "dinov2_vits14.pth", "vits14", seed=2)
    small = sets + ["evaluate.num_runs=1", "evaluate.num_samples=20", "evaluate.precision_recall=false", "evaluate.inception_score=false",
                    "evaluate.reference_max_images=20", "evaluate.during_training.every_kimg=0",
                    "evaluate.dinov2_arch=vits14", f"evaluate.dinov2_weights={weights}"]
    both, alone = tmp_path / "both" / "metrics.json", tmp_path / "alone" / "metrics.json"
    main(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "g",
          "--out", str(both), *_args(small + ["evaluate.extra_extractors=[dinov2]"])])
    main(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "g",
          "--out", str(alone), *_args(small + ["evaluate.extractor=dinov2"])])
    m, d = json.loads(both.read_text()), json.loads(alone.read_text())
    assert m["metric"] == "fd" and [x["metric"] for x in m["extra_metrics"]] == ["fd_dinov2"]
    x = m["extra_metrics"][0]
    assert x["metric_label"] == "FD-DINOv2" and x["extractor"]["feature_dim"] == 384
    assert x["reference"]["num_images"] == 20 and x["extractor"]["sha256"] == d["extractor"]["sha256"]
    assert len(m["summary"]["fd_dinov2"]["values"]) == 1 and all("fd_dinov2" in r and "fd" in r for r in m["runs"])
    assert m["summary"]["fd_dinov2"]["values"] == pytest.approx(d["summary"]["fd_dinov2"]["values"], rel=1e-4)
    from sida.eval.summary import group_models, results_rows

    row = results_rows(group_models([m]))[0]
    assert row["extra"][0]["metric"] == "fd_dinov2" and row["extra"][0]["value"]["mean"] == pytest.approx(
        m["summary"]["fd_dinov2"]["mean"])


def test_extra_extractor_equal_to_the_main_one_is_one_error_line(setup):
    root, sets = setup
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "x",
                 "--out", str(root / "x" / "metrics.json"), *_args(sets + ["evaluate.extra_extractors=[digits_classifier]"])])
    _assert_one_error_line(proc, "evaluate.extra_extractors", "digits_classifier", "already the main extractor")


def test_balanced_labels_need_a_multiple_of_the_class_count(setup):
    root, sets = setup
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "x",
                 "--out", str(root / "x" / "metrics.json"), *_args(sets + ["evaluate.num_samples=65"])])
    _assert_one_error_line(proc, "evaluate.num_samples: 65", "multiple of 10")


def test_evaluate_teacher_uses_heun_nfe(setup):
    from stages.evaluate import main

    root, sets = setup
    out = root / "t" / "metrics.json"
    main(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "teacher", "--name", "teacher",
          "--out", str(out), *_args(sets + ["evaluate.teacher_steps=3", "evaluate.num_runs=1"])])
    m = json.loads(out.read_text())
    assert m["nfe"] == 5 and m["kind"] == "teacher" and np.isfinite(m["summary"]["fd"]["mean"])


def test_missing_reference_is_one_error_line(setup):
    root, sets = setup
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "x",
                 "--out", str(root / "x" / "metrics.json"),
                 *_args(sets + [f"evaluate.reference={root / 'nope.npz'}"])])
    _assert_one_error_line(proc, "nope.npz")
    assert not (root / "x" / "metrics.json").exists()


def test_reference_with_wrong_feature_dimension_is_one_error_line(setup):
    root, sets = setup
    ref = root / "ref5.npz"
    np.savez(ref, mu=np.zeros(5), sigma=np.eye(5))
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "x",
                 "--out", str(root / "x" / "metrics.json"), *_args(sets + [f"evaluate.reference={ref}"])])
    _assert_one_error_line(proc, "5-dimensional", "128")


def test_reference_with_wrong_resolution_is_one_error_line(setup):
    root, sets = setup
    ref = root / "ref16.npz"
    np.savez(ref, mu=np.zeros(128), sigma=np.eye(128), resolution=16)
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "x",
                 "--out", str(root / "x" / "metrics.json"), *_args(sets + [f"evaluate.reference={ref}"])])
    _assert_one_error_line(proc, "resolution 16")


def test_network_not_matching_the_data_is_one_error_line(setup):
    root, sets = setup
    proc = _run(["--config", CONFIG, "--network", str(root / "net.pt"), "--kind", "generator", "--name", "x",
                 "--out", str(root / "x" / "metrics.json"), *_args(sets + ["data.resolution=16"])])
    _assert_one_error_line(proc, "8x8x1", "16x16x1")


def test_training_monitor(setup):
    from sida.run import dist
    from sida.io.checkpoints import load_network
    from sida.run.config import load_config
    from sida.eval.monitor import TrainingMonitor
    from sida.nets.sampler import one_step_generate

    root, sets = setup
    cfg = load_config(CONFIG, sets + ["evaluate.during_training.num_samples=60",
                                      "evaluate.during_training.every_kimg=0"])
    info = dist.init("cpu")
    try:
        mon = TrainingMonitor(cfg, torch.device("cpu"), info)
        assert not mon.enabled and mon.every_kimg == 0 and mon.key == "fd"
        net = load_network(root / "net.pt")
        gen = lambda z, c: one_step_generate(net, z, c, 2.5)  # noqa: E731
        a, b = mon(gen), mon(gen)
        assert set(a) == {"fd"} and a == b and np.isfinite(a["fd"])
        cfg2 = load_config(CONFIG, sets + ["evaluate.during_training.every_kimg=2"])
        assert TrainingMonitor(cfg2, torch.device("cpu"), info).enabled
    finally:
        dist.shutdown()


def test_bench_digits_classifier_agrees_with_cleanfid(capsys):
    from bench.fid import run

    out = run(["--extractor", "digits_classifier", "--num", "256", "--refs", "256", "--batch", "128"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(out))
    assert out["abs_diff"] <= 1e-3 and out["ours_img_per_s"] > 0 and out["cleanfid_img_per_s"] > 0


@pytest.mark.slow
def test_bench_random_inception_legacy_tensorflow(capsys):
    """Random Inception-v3 of the real architecture at 299 on CPU: slow, few images."""
    from bench.fid import run

    out = run(["--extractor", "inception-random", "--mode", "legacy_tensorflow", "--num", "8", "--refs", "8",
               "--batch", "4"])
    # 8 samples in 2048 dimensions: covariances are rank 7, where scipy's sqrtm (clean-fid) loses
    # digits; at real sample counts the two agree to 1e-3. Here: relative agreement.
    assert out["abs_diff"] <= 1e-6 * abs(out["fd_ours"]) + 1e-3


@pytest.mark.slow
def test_inception_extractor_from_local_file(tmp_path):
    from sida.errors import AssetError
    from sida.eval.features import InceptionExtractor, make_random_inception_file

    with pytest.raises(AssetError, match="inception-2015-12-05.pt"):
        InceptionExtractor(tmp_path / "inception-2015-12-05.pt")
    path = make_random_inception_file(tmp_path / "inc.pt")
    for mode in ("legacy_tensorflow", "clean"):
        ext = InceptionExtractor(path, mode)
        f, p = ext(torch.full((2, 1, 8, 8), 128, dtype=torch.uint8))
        assert f.shape == (2, 2048) and p.shape == (2, 1008) and torch.isfinite(f).all()
