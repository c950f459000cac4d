"""DMD / DMD2 and ADD in the one loop and the pipeline (fast): what a run declares is what it does.

Configs (phase kinds against discriminator kinds, generation sigmas, evaluation entries), the
loop's per-run settings on a tiny real network (critic ratio, AdamW, lr warm-up, grad-norm clip,
EMA off, heads in the critic's optimiser and the state), ADD on a random DINOv2 ViT-S/14 (the real
architecture, never a download), the stage's outputs and one-line errors, and few-step sampling
that does not depend on the batch.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import baseline_runs, error_lines, tiny_config  # noqa: E402
from test_presets import _reject  # noqa: E402  (one line naming the key, as for every config)

from sida.errors import CheckpointError  # noqa: E402
from sida.run.config import evaluation_entries, run_config, validate  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def _cfg(**runs) -> dict:
    cfg = tiny_config()
    cfg["distill"]["runs"].update(copy.deepcopy(baseline_runs()))
    cfg["distill"]["runs"].update(runs)
    return cfg


# -- configs ------------------------------------------------------------------------------------

def test_baseline_runs_validate_with_their_generation_sigmas():
    cfg = validate(_cfg())
    assert run_config(cfg, "dmd2")["gen_sigmas"] == [80.0]
    add = run_config(cfg, "add")
    assert add["gen_sigmas"] == pytest.approx([80.0, 17.50, 2.504, 0.1681], rel=1e-3)
    assert add["sigma_init"] == add["gen_sigmas"][0]
    assert run_config(cfg, "sid")["gen_sigmas"] == [2.5]
    # evaluation entries: one per step count, labelled with it when a run has several
    entries = evaluation_entries(cfg)
    assert entries["add"] == {"run": "add", "steps": 1, "label": "add (1 step)"}
    assert entries["add-4steps"] == {"run": "add", "steps": 4, "label": "add (4 steps)"}
    assert entries["dmd2"] == {"run": "dmd2", "steps": 1, "label": "dmd2"}
    assert "warmup" in entries  # tiny_config evaluates every run


def test_a_diffusers_teachers_init_timestep_sets_sigma_init_and_the_generation_sigmas():
    from sida.run.config import resolve_run

    class Scheduler:  # what resolve_run reads of a diffusers teacher: its sigma table
        def sigma_at(self, timestep: int) -> float:
            return timestep / 100

    rc = run_config(validate(_cfg()), "sid")
    out = resolve_run({**rc, "init_timestep": 300}, Scheduler())
    assert out["sigma_init"] == out["gen_sigmas"][0] == 3.0
    assert rc["sigma_init"] == 2.5 and rc["gen_sigmas"] == [2.5]  # config resolution: no teacher, a copy


@pytest.mark.parametrize("run,edit,needles", [
    ("dmd2", {"discriminator": "none"}, ["distill.runs.dmd2", "'dmd2' phase needs discriminator: dmd2_head"]),
    ("dmd2", {"discriminator": "add"}, ["distill.runs.dmd2", "dmd2_head"]),
    ("add", {"discriminator": True}, ["distill.runs.add", "discriminator sida does not go with add"]),
    ("add", {"phases": [{"kind": "add", "kimg": 0.1}, {"kind": "sid", "kimg": 0.1}]}, ["several methods"]),
    ("add", {"sigma_init": 2.5}, ["distill.runs.add.sigma_init", "largest student level"]),
    ("add", {"eval_steps": [1, 5]}, ["distill.runs.add.eval_steps", "at most 4"]),
    ("dmd2", {"eval_steps": [1, 2]}, ["distill.runs.dmd2.eval_steps", "at most 1"]),
    ("dmd2", {"augment": 0.5}, ["distill.runs.dmd2.augment"]),
    ("dmd2", {"dm_index_range": [900, 20]}, ["distill.runs.dmd2.dm_index_range"]),
    ("add", {"discriminator": "none", "phases": [{"kind": "warmup", "kimg": 0.1}, {"kind": "add", "kimg": 0.1}]},
     ["distill.runs.add", "'warmup' phase of an ADD run"]),
    ("add", {"init_generator": "sid"}, ["distill.runs.add.init_generator"]),
])
def test_mismatched_baseline_runs_are_one_line_errors(run, edit, needles):
    cfg = _cfg()
    cfg["distill"]["runs"][run].update(edit)
    _reject(cfg, *needles)


def test_schema_rejects_unknown_discriminator_and_optimizer():
    cfg = _cfg()
    cfg["distill"]["runs"]["dmd2"]["discriminator"] = "stylegan"
    _reject(cfg, "distill.runs.dmd2.discriminator")
    cfg = _cfg()
    cfg["distill"]["runs"]["dmd2"]["optimizer"] = "sgd"
    _reject(cfg, "distill.runs.dmd2.optimizer")


def test_evaluation_entry_named_like_a_run_is_refused():
    cfg = _cfg(**{"add-4steps": {"init": "teacher", "phases": [{"kind": "sid", "kimg": 0.1}]}})
    _reject(cfg, "distill.runs.add.eval_steps", "add-4steps")


# -- the loop on a tiny real network -----------------------------------------------------------

def _loop(run: str, cfg_edit=None, seed: int = 0, **run_edit):
    from sida.io.data import open_dataset
    from sida.nets.build import network_from_config
    from sida.run import dist
    from sida.train.loop import DistillLoop
    from sida.train.nets import init_nets

    cfg = _cfg()
    cfg["distill"]["runs"][run].update(run_edit)
    if cfg_edit:
        cfg_edit(cfg)
    cfg = validate(cfg)
    torch.manual_seed(0)
    teacher = network_from_config(cfg).requires_grad_(False)
    rc = run_config(cfg, run)
    nets = init_nets(teacher, rc["dropout"])
    return DistillLoop(rc, nets, open_dataset(cfg["data"]), dist.init("cpu", 0), seed=seed)


def _step(loop) -> dict:
    stats = loop.step()
    loop.nimg += loop.batch
    return stats


def _params(net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _moved(before, net) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_dmd2_run_declares_what_it_does():
    from sida.nets.heads import DMD2Head

    loop = _loop("dmd2")
    n = loop.nets
    assert loop.method_name == "dmd" and loop.disc == "dmd2_head" and isinstance(n.head, DMD2Head)
    # the head reads the fake score's bottleneck (8x8 digits, 2 levels: 16 channels at 4x4)
    assert (n.head.channels, n.head.resolution) == (16, 4)
    # AdamW (0.9, 0.999), weight decay 0.01, for G and for the critic = fake score + head
    assert type(loop.opt_g) is torch.optim.AdamW and loop.opt_g.defaults["betas"] == (0.9, 0.999)
    assert loop.opt_critic.defaults["weight_decay"] == 0.01
    assert len(loop.critic_params) == len(list(n.fake.parameters())) + len(list(n.head.parameters()))
    assert loop.gen_sigmas == [80.0]
    # warm-up phase (2 iterations): the critic learns, the generator does not move
    g0, f0, h0 = _params(n.G), _params(n.fake), _params(n.head)
    # lr warm-up over 64 images: 0 at the first iteration, then a quarter
    _step(loop)
    assert loop.opt_critic.param_groups[0]["lr"] == 0.0 and not _moved(f0, n.fake)
    stats = _step(loop)
    assert loop.opt_critic.param_groups[0]["lr"] == pytest.approx(1e-4 * 16 / 64)
    assert _moved(f0, n.fake) and _moved(h0, n.head) and not _moved(g0, n.G)
    assert "loss_g_dm" not in stats and {"loss_fake", "loss_d", "d_acc_real", "d_acc_fake"} <= set(stats)
    # dmd2 phase, critic ratio 2: iterations 2 (turn), 3 (critic only), 4 (turn)
    stats = _step(loop)
    assert {"loss_g_dm", "loss_g_adv", "loss_fake"} <= set(stats) and _moved(g0, n.G)
    g1 = _params(n.G)
    stats = _step(loop)
    assert "loss_g_dm" not in stats and not _moved(g1, n.G)
    _step(loop)
    assert _moved(g1, n.G)
    # no EMA: G_ema is the raw generator
    assert all(torch.equal(a, b) for a, b in zip(n.G_ema.parameters(), n.G.parameters()))
    # the state holds the head, and a loop restored from it continues identically
    state = copy.deepcopy(loop.state_dict())
    assert "head" in state and "opt_f" in state
    other = _loop("dmd2", seed=5)
    other.load_state_dict(state)
    for k, g in loop.gens.items():
        other.gens[k].set_state(g.get_state())
    _step(loop), _step(other)
    for a, b in zip(loop.nets.head.parameters(), other.nets.head.parameters()):
        assert torch.equal(a, b)


def test_grad_norm_clip_bounds_every_update(monkeypatch):
    import sida.train.loop as loop_mod

    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = orig(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen.append((float(total), float(after)))
        return total

    monkeypatch.setattr(loop_mod.torch.nn.utils, "clip_grad_norm_", spy)
    loop = _loop("dmd2", grad_clip=1e-3)
    for _ in range(3):
        _step(loop)
    assert len(seen) == 4  # 3 critic updates, 1 generator turn
    assert all(after <= 1e-3 * 1.001 for _, after in seen) and any(before > 1e-3 for before, _ in seen)


def test_sid_family_defaults_are_todays_adam():
    loop = _loop("sid")
    assert type(loop.opt_g) is torch.optim.Adam and loop.opt_g.defaults["betas"] == (0.0, 0.999)
    assert loop.opt_critic.defaults["weight_decay"] == 0.0 and loop.nets.head is None
    assert "head" not in loop.state_dict()


def test_add_run_trains_heads_not_the_fake_score():
    from sida.nets.heads import ADDHeads, TeacherFeatures

    loop = _loop("add")
    n = loop.nets
    assert isinstance(n.head, ADDHeads) and isinstance(n.features, TeacherFeatures)
    assert [h.channels for h in n.head.heads] == [8, 16]  # every encoder level of the teacher
    assert len(loop.critic_params) == len(list(n.head.parameters()))
    f0, h0, g0 = _params(n.fake), _params(n.head), _params(n.G)
    t0 = _params(n.teacher)
    _step(loop)
    stats = _step(loop)  # warm-up (2 iterations): heads only
    assert _moved(h0, n.head) and not _moved(g0, n.G) and {"loss_d", "d_acc_real", "d_acc_fake", "r1"} <= set(stats)
    stats = _step(loop)
    assert _moved(g0, n.G) and {"loss_g_distill", "loss_g_adv"} <= set(stats)
    assert not _moved(f0, n.fake) and not _moved(t0, n.teacher)


def test_add_on_a_random_dinov2_and_a_changed_weights_file_is_refused(tmp_path):
    """ADD's paper-scale features: DINOv2 ViT-S/14 (random weights of the real architecture)."""
    from sida.eval.features import save_random_dinov2
    from sida.nets.vit import DINOv2Features

    weights = save_random_dinov2(tmp_path / "dinov2_vits14.pth", "vits14")
    feats = {"kind": "dinov2", "arch": "vits14", "weights": str(weights)}

    def small(cfg):
        cfg["distill"]["batch"] = 2

    loop = _loop("add", small, add_features=feats)
    assert isinstance(loop.nets.features, DINOv2Features)
    assert [h.channels for h in loop.nets.head.heads] == [384] * 4 and loop.nets.head.heads[0].tokens == 256
    assert not any(p.requires_grad for p in loop.nets.features.parameters())
    loop.features_sha256 = "a" * 64
    _step(loop), _step(loop)
    state = loop.state_dict()
    assert state["features_sha256"] == "a" * 64
    loop.features_sha256 = "b" * 64
    with pytest.raises(CheckpointError, match="ADD features"):
        loop.load_state_dict(state)


# -- the stage ----------------------------------------------------------------------------------

def test_stage_records_generation_sigmas_and_head_and_a_later_run_keeps_the_head(tmp_path, capsys, stage_inputs):
    from sida.io import checkpoints
    from sida.run.cli import run_stage
    from stages.distill import main

    cfg = _cfg()
    runs = cfg["distill"]["runs"]
    runs["dmd2"]["phases"] = [{"kind": "dmd2", "kimg": 0.032}]
    runs["dmd2_more"] = dict(runs["dmd2"], init="dmd2")
    runs["add"]["phases"] = [{"kind": "add", "kimg": 0.016}]
    cfg_path, teacher = stage_inputs(tmp_path, cfg)
    base = ["--config", str(cfg_path), "--teacher", str(teacher)]
    run_stage(main, [*base, "--run", "dmd2", "--out", str(tmp_path / "dmd2")])
    run_stage(main, [*base, "--run", "add", "--out", str(tmp_path / "add")])
    meta = checkpoints.load_network(tmp_path / "dmd2" / "network.pt").sida_meta
    assert meta["gen_sigmas"] == [80.0] and meta["sigma_init"] == 80.0 and meta["method"] == "dmd"
    assert meta["ema"] is False
    add_meta = checkpoints.load_network(tmp_path / "add" / "network.pt").sida_meta
    assert len(add_meta["gen_sigmas"]) == 4 and add_meta["sigma_init"] == pytest.approx(80.0)
    state = checkpoints.load_state(tmp_path / "dmd2" / "state.pt")
    assert state["head"]["class"] == "DMD2Head"
    from sida.train.nets import init_nets

    nets = init_nets(checkpoints.load_network(teacher), None, state)
    for k, v in nets.head.state_dict().items():
        assert torch.equal(v, state["head"]["state_dict"][k])
    capsys.readouterr()


def test_missing_dinov2_weights_is_one_error_line_before_any_output(tmp_path, stage_here, stage_inputs):
    cfg = _cfg()
    cfg["distill"]["runs"]["add"]["add_features"] = {"kind": "dinov2", "arch": "vits14"}
    cfg["results_dir"] = str(tmp_path / "results")
    cfg_path, teacher = stage_inputs(tmp_path, cfg)
    out = tmp_path / "out"
    code, err = stage_here("stages.distill", ["--config", str(cfg_path), "--teacher", str(teacher), "--run", "add",
                                              "--out", str(out)])
    errs = error_lines(err)
    assert code == 1 and len(errs) == 1, err
    assert "dinov2_vits14.pth" in errs[0] and "fetch" in errs[0] and "Traceback" not in err
    assert not out.exists()


# -- sampling ----------------------------------------------------------------------------------

class _Shift(torch.nn.Module):
    """A 'generator' that remembers the sigmas it is called at: D(x, s) = x / (1 + s)."""

    img_channels, img_resolution, label_dim = 1, 4, 0

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append(float(sigma.reshape(-1)[0]))
        return x / (1 + sigma.reshape(-1, 1, 1, 1))


def test_few_step_sampling_is_batch_independent_and_visits_the_levels():
    from sida.eval.sampling import generator_sample
    from sida.nets.sampler import sampling_sigmas

    levels = [80.0, 17.5, 2.5, 0.25]  # float32-exact
    assert sampling_sigmas(levels, 1) == [80.0] and sampling_sigmas(levels, 2) == [80.0, 2.5]
    assert sampling_sigmas(levels, 4) == levels
    with pytest.raises(ValueError):
        sampling_sigmas(levels, 5)
    G = _Shift()
    z = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = generator_sample(G, z, None, levels)
    assert G.calls == levels
    parts = torch.cat([generator_sample(G, z[i:i + 1], None, levels) for i in range(6)])
    assert torch.equal(whole, parts)  # re-noising comes from each sample's own latent
    # and it is noise: another latent gets other re-noising, the same one the same
    again = generator_sample(G, z.flip(0), None, levels)
    assert torch.equal(again, whole.flip(0))
    one = generator_sample(G, z, None, levels[:1])
    assert torch.equal(one, 80.0 * z / 81.0)


def test_digits_baselines_preset_runs_every_method_under_one_evaluation():
    from sida.run.config import load_config

    cfg = load_config(CONFIG_DIR / "digits-baselines.yaml")
    entries = evaluation_entries(cfg)
    labels = {e["label"] for e in entries.values()}
    assert labels == {"SiD", "SiDA", "SiD2A", "DMD2", "ADD (1 step)", "ADD (4 steps)"}
    methods = {name: run_config(cfg, name) for name in cfg["distill"]["runs"]}
    assert methods["dmd2"]["discriminator"] == "dmd2_head" and methods["dmd2"]["gen_sigmas"] == [80.0]
    assert methods["add"]["discriminator"] == "add" and methods["add"]["eval_steps"] == [1, 4]
    # the embedded default's teacher, data and evaluation: the numbers compare with docs/baselines.md's
    base = load_config(CONFIG_DIR / "config.yaml")
    for key in ("data", "network", "teacher"):
        assert cfg[key] == base[key], key
    assert cfg["evaluate"] == base["evaluate"]  # same seeds, samples, labels, noise and classifier
    assert cfg["resources"] == base["resources"]  # the same teacher needs the same process layout
    # the SiD family as the default runs it, for longer: same settings, same structure
    for run in ("sid", "sida", "sid2a"):
        ours, theirs = methods[run], run_config(base, run)
        assert (ours["init"], ours["init_generator"]) == (theirs["init"], theirs["init_generator"]), run
        for key in ("lambda_adv", "lr_fake", "lr_g", "alpha", "discriminator"):
            assert ours[key] == theirs[key], (run, key)
        assert [p["kind"] for p in ours["phases"]] == [p["kind"] for p in theirs["phases"]], run
    assert yaml.safe_load((CONFIG_DIR / "digits-baselines.yaml").read_text())["experiment"] == "digits-baselines"


def test_evaluate_add_in_four_steps_records_steps_sigmas_and_label(tmp_path):
    """The evaluate stage samples a generator at the sigmas its file records, in --steps steps."""
    from sida.io import checkpoints
    from sida.nets.precond import EDMPrecond
    from stages.evaluate import main

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    levels = [80.0, 17.5, 2.5, 0.17]
    checkpoints.save_network(tmp_path / "add.pt", net, meta={"one_step": True, "sigma_init": 80.0, "gen_sigmas": levels})
    sets = [f"results_dir={tmp_path / 'results'}", "evaluate.num_runs=1", "evaluate.num_samples=40",
            "evaluate.batch=40", "evaluate.classifier.epochs=1", "evaluate.pr_max_samples=40",
            "evaluate.inception_score=false"]
    args = ["--config", str(CONFIG_DIR / "config.yaml"), *[a for s in sets for a in ("--set", s)],
            "--network", str(tmp_path / "add.pt"), "--kind", "generator", "--name", "add-4steps"]
    main([*args, "--steps", "4", "--label", "ADD (4 steps)", "--out", str(tmp_path / "e4" / "metrics.json")])
    import json

    m = json.loads((tmp_path / "e4" / "metrics.json").read_text())
    assert (m["nfe"], m["steps"], m["label"]) == (4, 4, "ADD (4 steps)") and m["sigmas"] == levels
    main([*args, "--out", str(tmp_path / "e1" / "metrics.json")])
    m1 = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert (m1["nfe"], m1["sigmas"], m1["label"]) == (1, [80.0], "add-4steps")
    assert m1["summary"]["fd"]["mean"] != m["summary"]["fd"]["mean"]  # other samples
    # the sample grid is drawn as evaluated (4 steps from its recorded levels vs one step at 80)
    assert (tmp_path / "e4" / "samples.png").read_bytes() != (tmp_path / "e1" / "samples.png").read_bytes()


def test_generate_in_more_steps_than_the_generator_has_levels_is_one_error_line(tmp_path, capsys):
    from sida.io import checkpoints
    from sida.nets.precond import EDMPrecond
    from sida.run.cli import run_stage
    from stages.generate import main

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    checkpoints.save_network(tmp_path / "dmd2.pt", net, meta={"one_step": True, "sigma_init": 80.0, "gen_sigmas": [80.0]})
    with pytest.raises(SystemExit) as exc:
        run_stage(main, ["--network", str(tmp_path / "dmd2.pt"), "--out", str(tmp_path / "g"), "--steps", "2"])
    errs = error_lines(capsys.readouterr().err)
    assert exc.value.code == 1 and len(errs) == 1 and "--steps 2" in errs[0] and "1 to 1" in errs[0]
    assert not (tmp_path / "g").exists()
