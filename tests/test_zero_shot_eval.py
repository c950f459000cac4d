"""Zero-shot COCO evaluation wired into the evaluate stage (sida.eval.zero_shot_eval): a tiny
random Stable Diffusion pipeline (its VAE makes 16x16 RGB images) is scored over two runs on a
folder of three captions and a few RGB "COCO" images, with a tiny open_clip model and a pool
extractor standing in for clean-mode Inception. Checked by hand: the caption every seed got, and
each run's FID and CLIP score recomputed from images sampled here; bad settings fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from PIL import Image

from conftest import REPO
from sd_assets import save_tiny_sd_pipeline
from zero_shot_assets import TINY_CLIP, PoolExtractor, save_tiny_clip

CAPTIONS = ["a red bus", "two dogs on a bench", "a bowl of fruit"]
SIGMA_INIT = 2.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sida.io.checkpoints import save_network
    from sida.io.diffusers_teacher import load_teacher

    root = tmp_path_factory.mktemp("zero_shot_eval")
    folder = save_tiny_sd_pipeline(root / "sd", "epsilon")
    save_network(root / "net.pt", load_teacher(folder))
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir()
    for i, (h, w) in enumerate([(12, 20), (16, 16), (20, 10), (9, 14), (15, 11)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2014" / f"{i}.png")
    clip = save_tiny_clip(root)
    raw = yaml.safe_load((REPO / "config" / "ci-sd.yaml").read_text())
    raw["teacher"]["path"] = str(folder)
    raw["results_dir"] = str(root / "results")
    raw["distill"]["sigma_init"] = SIGMA_INIT
    raw["evaluate"] = {
        "data": None, "class_prompt": None, "extractor": "inception", "inception_mode": "clean",
        "prompts": str(root / "captions.txt"), "coco": {"images": str(root / "val2014"), "resolution": 8},
        "clip": {"model": TINY_CLIP, "weights": str(clip)}, "num_runs": 2, "num_samples": 5, "batch": 2,
        "teacher_steps": 2, "teacher_guidance": 1.5, "inception_score": False, "precision_recall": False,
        "grid_size": 2, "during_training": {"num_samples": 4}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.fixture
def encoded(monkeypatch):
    """Every prompt list the text encoder is asked for, in order; the pool extractor for Inception."""
    from sida.io.text_encoder import TextEncoder

    calls: list[list[str]] = []
    encode = TextEncoder.encode

    def recording(self, prompts):
        calls.append(list(prompts))
        return encode(self, prompts)

    monkeypatch.setattr(TextEncoder, "encode", recording)
    monkeypatch.setattr("sida.eval.evaluation.build_extractor", lambda cfg, device="cpu": PoolExtractor())
    return calls


def _evaluate(root: Path, kind: str, *sets: str) -> dict:
    from stages.evaluate import main

    out = root / kind / "metrics.json"
    main(["--config", str(root / "cfg.yaml"), "--network", str(root / "net.pt"), "--kind", kind, "--name", kind,
          "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    return json.loads(out.read_text())


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets, from its formula."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_generator_runs_by_hand(setup, encoded):
    from sida.eval.clip_score import ClipScorer
    from sida.eval.coco import prepare_image, prepare_images
    from sida.io.checkpoints import load_network
    from sida.io.text_run import text_encoder_of, vae_of
    from sida.nets.sampler import one_step_generate

    m = _evaluate(setup, "generator")
    # the grid's two rows are the first two captions; then seed s is sampled with caption s mod 3
    assert encoded[0] == CAPTIONS[:2]
    assert encoded[1:] == [[CAPTIONS[s % 3] for s in b] for b in ([0, 1], [2, 3], [4], [5, 6], [7, 8], [9])]
    assert m["metric"] == "fid" and m["seeds"] == [[0, 4], [5, 9]] and m["nfe"] == 1
    assert m["reference"]["source"] == "coco" and m["reference"]["num_images"] == 5
    assert m["zero_shot"]["num_captions"] == 3 and m["zero_shot"]["clip"]["model"] == TINY_CLIP
    assert all(r["class_counts"] is None for r in m["runs"]) and "alignment" not in m["summary"]
    assert any("5 samples per run" in n for n in m["notes"])  # not the protocol's 30,000
    assert not any("precision/recall" in n for n in m["notes"])  # off here; said when it is asked for

    # By hand: each seed's noise, caption, one step at sigma_init, the VAE, crop + resize to 8 px.
    net = load_network(setup / "net.pt")
    encoder, vae = text_encoder_of(net, "cpu"), vae_of(net, "cpu")
    real = [prepare_image(Image.open(p), 8) for p in sorted((setup / "val2014").iterdir())]
    ref_feats = PoolExtractor()(torch.from_numpy(np.stack(real)).permute(0, 3, 1, 2))[0].double().numpy()
    scorer = ClipScorer(TINY_CLIP, setup / "tiny.bin")
    for run, (first, last) in zip(m["runs"], m["seeds"]):
        seeds = range(first, last + 1)
        prompts = [CAPTIONS[s % 3] for s in seeds]
        z = torch.stack([torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(s)) for s in seeds])
        with torch.no_grad():
            images = vae.decode(one_step_generate(net, z, encoder.encode(prompts), sigma_init=SIGMA_INIT))
        assert images.shape == (5, 3, 16, 16)
        prepared = prepare_images(images, 8)
        feats = PoolExtractor()(prepared)[0].double().numpy()
        assert run["fid"] == pytest.approx(_fid(feats, ref_feats), rel=1e-4)
        assert run["clip_score"] == pytest.approx(float(scorer.score(prepared, prompts).mean()), abs=1e-5)
    for key in ("fid", "clip_score"):  # summaries with standard errors, as for every metric
        s = m["summary"][key]
        assert s["values"] == [r[key] for r in m["runs"]] and s["se"] == pytest.approx(abs(np.diff(s["values"])[0]) / 2)



def test_eval_spread_scores_as_the_stage(setup, encoded, capsys):
    """bench.eval_spread on the zero-shot path: the FIDs of the same seed ranges as the stage's runs."""
    from bench.eval_spread import main

    m = _evaluate(setup, "generator")
    capsys.readouterr()
    main(["--config", str(setup / "cfg.yaml"), "--network", str(setup / "net.pt"), "--runs", "2", "--samples", "5",
          "--latents", "iid", "--seed", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["results"][0]["values"] == pytest.approx(m["summary"]["fid"]["values"], rel=1e-6)


def test_teacher_guided(setup, encoded):
    m = _evaluate(setup, "teacher", "evaluate.num_runs=1", "evaluate.precision_recall=true")
    assert "precision/recall skipped: the COCO reference statistics keep no image features" in m["notes"]
    assert m["nfe"] == 2 * (2 * 2 - 1)  # Heun in 2 steps, each guided step on prompt and empty prompt
    assert set(m["summary"]) == {"fid", "clip_score"} and np.isfinite(m["summary"]["clip_score"]["mean"])
    assert encoded[1:] == [[CAPTIONS[s % 3] for s in b] for b in ([0, 1], [2, 3], [4])]


def test_bad_settings_one_line(setup, tmp_path):
    from sida.errors import AssetError, ConfigError
    from sida.eval.zero_shot_eval import prepare_zero_shot
    from sida.io.checkpoints import load_network
    from sida.nets.precond import EDMPrecond
    from sida.run.config import load_config
    from sida.run.dist import DistInfo

    cfg = load_config(setup / "cfg.yaml")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    net = load_network(setup / "net.pt")
    pixel = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
                       channel_mult=[1], num_blocks=1, attn_resolutions=[])
    cases = [
        (pixel, {}, ConfigError, "network edm.pt is not conditioned on text: unset evaluate.coco"),
        (net, {"prompts": str(tmp_path / "missing.txt")}, AssetError, "captions file .*missing.txt does not exist"),
        (net, {"coco": None}, ConfigError, "evaluate.clip scores .* against their COCO captions: set evaluate.coco"),
        (pixel, {"coco": None}, ConfigError, "evaluate.clip scores .* against their COCO captions: set evaluate.coco"),
        (net, {"extra_extractors": ["dinov2"]}, ConfigError, "extra_extractors are not computed"),
    ]
    for network, evaluate, error, match in cases:
        bad = {**cfg, "evaluate": {**cfg["evaluate"], **evaluate}}
        with pytest.raises(error, match=match) as exc:
            prepare_zero_shot(bad, network, "edm.pt", PoolExtractor(), info)
        assert "\n" not in str(exc.value)
    # neither coco nor clip: the class-prompt path (None), whatever the network
    off = {**cfg, "evaluate": {**cfg["evaluate"], "coco": None, "clip": None}}
    assert prepare_zero_shot(off, net, "net.pt", PoolExtractor(), info) is None


@pytest.mark.slow
def test_two_processes_give_the_one_process_numbers(setup, tmp_path):
    """torchrun with 2 ranks: each samples every other seed, the main rank computes the COCO
    reference while the other waits and then reads its cache; FID, CLIP score and the monitor's
    FID of the first seeds equal one process's (a random Inception-v3 of the real architecture,
    in clean mode)."""
    import os
    import shutil
    import subprocess
    import sys

    from sida.eval.features import make_random_inception_file

    inception = make_random_inception_file(tmp_path / "inception.pt")
    # the stage, with the tiny CLIP registered in the process (open_clip knows it only from its file)
    (tmp_path / "evaluate.py").write_text(
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import open_clip\n"
        f"open_clip.add_model_config({str(setup / (TINY_CLIP + '.json'))!r})\n"
        "from sida.run.cli import run_stage; from stages.evaluate import main; run_stage(main)\n")
    values = {}
    for procs in (1, 2):
        out = tmp_path / str(procs) / "metrics.json"
        args = [str(tmp_path / "evaluate.py"), "--config", str(setup / "cfg.yaml"), "--network", str(setup / "net.pt"),
                "--kind", "generator", "--name", "g", "--out", str(out)]
        for s in (f"evaluate.inception_weights={inception}", f"results_dir={tmp_path / str(procs)}",
                  "evaluate.num_runs=1", "evaluate.during_training.every_kimg=1"):
            args += ["--set", s]
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [sys.executable, *args] if procs == 1 else [torchrun, "--standalone", "--nproc-per-node", "2", *args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads(out.read_text())
        assert m["world_size"] == procs and m["extractor"]["feature_dim"] == 2048
        values[procs] = {**m["runs"][0], "monitor": m["monitor"]["fid"]}
    assert values[2]["fid"] == pytest.approx(values[1]["fid"], rel=1e-5)
    assert values[2]["clip_score"] == pytest.approx(values[1]["clip_score"], abs=1e-6)
    # the FID of the first 4 of the 5 seeds: the same only when the ranks' features are put back in seed order
    assert values[2]["monitor"] == pytest.approx(values[1]["monitor"], rel=1e-5)


def test_kept_runs_are_taken_on_a_rerun(setup, encoded, tmp_path):
    """A rerun takes each finished run's FID and CLIP score from the kept file, sampling nothing."""
    from sida.eval.evaluation import evaluate_network
    from sida.run.config import with_data_of
    from sida.run import dist
    from sida.run.config import load_config

    cfg = with_data_of(load_config(setup / "cfg.yaml", ["evaluate.num_runs=1"]), "evaluate")
    info = dist.init("cpu", 1)
    try:
        first, _ = evaluate_network(cfg, setup / "net.pt", "generator", "g", info, keep=(tmp_path, "m"))
        assert len(list(tmp_path.glob("m.run0.*.pt"))) == 1 and len(encoded) == 1 + 3  # grid, 3 batches
        again, _ = evaluate_network(cfg, setup / "net.pt", "generator", "g", info, keep=(tmp_path, "m"))
    finally:
        dist.shutdown()
    assert len(encoded) == 1 + 3 + 1  # only the grid's prompts again
    assert again["runs"][0]["fid"] == first["runs"][0]["fid"]
    assert again["runs"][0]["clip_score"] == first["runs"][0]["clip_score"]
