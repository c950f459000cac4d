"""Diffusers teachers (issue 26): a tiny random UNet2DModel made here (nothing is downloaded)
wrapped as an EDM denoiser. D equals the scheduler's own x0 prediction at its timesteps for each
prediction type; the fractional timestep interpolates the sigma table; the 35-NFE Heun sampler
integrates the ODE diffusers' DDIM sampler discretises; the SiDA/DMD2 return flags; folder and
config checks give one line; teacher.url downloads; SiDA, DMD2 and ADD iterations on the wrapped
teacher. About 2.5 min on a 2-core CPU at load 10 (90 s of it the sampler test), 40 s of CPU."""

from __future__ import annotations

import json

import pytest
import torch

from diffusers_assets import make_tiny_unet, save_tiny_teacher
from sida.errors import AssetError, ConfigError



def wrap(unet, sched, label_dim: int = 0):
    """The wrapper around an in-memory UNet (the fetch stage's load_teacher reads the same from a folder)."""
    from sida.nets.diffusers_vp import DiffusersVPPrecond

    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    net = DiffusersVPPrecond(cfg, sched.alphas_cumprod.double().tolist(), sched.config.prediction_type,
                             label_dim=label_dim)
    net.model.unet.load_state_dict(unet.state_dict())
    return net.eval()


@pytest.mark.parametrize("pred,scheduler", [("epsilon", "DDPMScheduler"), ("v_prediction", "DDIMScheduler"),
                                            ("sample", "DDPMScheduler")])
def test_denoiser_is_the_schedulers_x0_prediction(pred, scheduler):
    unet, sched = make_tiny_unet(pred, label_dim=10, scheduler=scheduler)
    net = wrap(unet, sched, label_dim=10)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    classes = torch.tensor([0, 3, 7, 9])
    if scheduler == "DDIMScheduler":
        sched.set_timesteps(1000)  # step() needs the inference grid; 1000 steps = every training step
    for t in (0, 1, 250, 999):
        abar = sched.alphas_cumprod[t]
        x_vp = abar.sqrt() * x0 + (1 - abar).sqrt() * n
        sigma = ((1 - abar) / abar).sqrt()
        with torch.no_grad():
            ref = sched.step(unet(x_vp, t, classes).sample, t, x_vp).pred_original_sample
            d = net(x_vp / abar.sqrt(), sigma, torch.nn.functional.one_hot(classes, 10).float())
        # EDM's x = x_vp / sqrt(abar) is 1/sqrt(abar) (up to 157) times x_vp: float32 rounding of
        # the rescaling grows with sigma, so the tolerance does too.
        torch.testing.assert_close(d, ref, atol=1e-5 * (1 + float(sigma)), rtol=1e-5)


def test_fractional_timestep_interpolates_log_sigma():
    unet, sched = make_tiny_unet()
    net = wrap(unet, sched)
    sig = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt().double()
    assert net.sigma_min == pytest.approx(float(sig[0])) and net.sigma_max == pytest.approx(float(sig[-1]))
    k = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(net.timestep(sig[k].float()), k.float(), atol=2e-3, rtol=0)
    mid = (0.25 * sig[500].log() + 0.75 * sig[501].log()).exp().float()
    assert float(net.timestep(mid.reshape(1))) == pytest.approx(500.75, abs=2e-3)
    # Outside the table the timestep stays at its ends; it never decreases with sigma.
    assert net.timestep(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 999.0]
    t = net.timestep(torch.logspace(-3, 3, 200))
    assert bool((t[1:] >= t[:-1]).all())


def test_return_flags_for_sida_and_dmd2():
    from sida.io.checkpoints import network_from_record, network_record
    from sida.nets.build import clone_with_dropout

    net = wrap(*make_tiny_unet("v_prediction", label_dim=10), label_dim=10)
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, generator=g) * 5 + 0.1
    labels = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).float()
    with torch.no_grad():
        d_all = net(x, sigma, labels)
        d, logits = net(x, sigma, labels, return_flag="encoder_decoder", decode_first=2)
        enc = net(x, sigma, labels, return_flag="encoder")
        feats = net(x, sigma, labels, return_flag="encoder_features")
    torch.testing.assert_close(d, d_all[:2])
    torch.testing.assert_close(logits, enc)
    assert logits.shape == (6, 1, 4, 4) and feats[-1].shape == (6, 16, 4, 4)
    # Rebuilt from its record (the network files' format) and cloned with another dropout: same weights.
    again = network_from_record(network_record(net))
    clone = clone_with_dropout(net, 0.1)
    assert clone.init_kwargs["dropout"] == 0.1 and clone.model.unet.config.dropout == 0.1
    with torch.no_grad():
        assert torch.equal(again(x, sigma, labels), d_all) and torch.equal(clone.eval()(x, sigma, labels), d_all)


def test_heun_sampler_follows_the_ode_of_diffusers_ddim(pred="epsilon"):
    """DDIM with eta 0 is Euler's method on the probability-flow ODE dx/dsigma = (x - D)/sigma in
    EDM's variables, so with many steps it converges to the ODE's solution: EDM's Heun sampler (18
    steps, 35 NFE) on the wrapped teacher must land on the same images from the same noise (the
    same samples, hence the same distribution). An untrained network has no data distribution
    to compare otherwise; its output layer is kept small so that the ODE is not stiff. (Only
    epsilon: untrained v / sample networks give ODEs on which 18 Heun and 50 DDIM steps part.)"""
    import diffusers

    from sida.nets.sampler import heun_sampler

    unet, sched = make_tiny_unet(pred, out_std=0.01)
    net = wrap(unet, sched)
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = heun_sampler(net, z, sigma_min=net.sigma_min, sigma_max=net.sigma_max)
    ddim = diffusers.DDIMScheduler.from_config(sched.config, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(50)  # trailing: the first step is t = 999, Heun's sigma_max
    x = z * net.sigma_max / (1 + net.sigma_max ** 2) ** 0.5  # Heun's start sigma_max z in VP scaling
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    err = float((x - ours).abs().max() / x.abs().max())
    assert err < 0.03, err


def _write(folder, rel, data):
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"), ("no_config", "has no config.json"),
    ("condition", "has no text_encoder/: place the pipeline's text_encoder/ there"),
    ("flow", "scheduler 'FlowMatchEulerDiscreteScheduler'"), ("prediction", "prediction_type 'flow'"),
    ("no_scheduler", "scheduler_config.json is missing")])
def test_bad_folders_give_one_line(tmp_path, case, needle):
    from sida.io.diffusers_teacher import check_folder

    root = tmp_path / "m"
    unet, sched = {"_class_name": "UNet2DModel", "sample_size": 8}, {"_class_name": "DDPMScheduler"}
    if case == "condition":
        unet.update(_class_name="UNet2DConditionModel", cross_attention_dim=32)  # text parts missing
    sched.update({"flow": {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "prediction": {"prediction_type": "flow"}}
                 .get(case, {}))
    if case != "missing":
        root.mkdir()
    if case not in ("missing", "no_config"):
        _write(root, "unet/config.json", unet)
        if case != "no_scheduler":
            _write(root, "scheduler/scheduler_config.json", sched)
    with pytest.raises(AssetError) as exc:
        check_folder(root)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_config_validation_and_folder_import(tmp_path):
    """teacher.source diffusers is checked when the config loads; the fetch stage's import of a
    saved folder gives the same denoiser as the in-memory model."""
    from sida.io.diffusers_teacher import load_teacher
    from sida.run.config import validate

    def config(**teacher):
        return {"experiment": "x", "teacher": {"source": "diffusers", **teacher}}

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="teacher.path: diffusers teacher: .* has no config.json"):
        validate(config(path=str(tmp_path / "empty")))
    validate(config(path=str(tmp_path / "nope")))  # made later (presets): the fetch job says it is missing
    with pytest.raises(ConfigError, match="needs teacher.path .*, teacher.hub"):
        validate(config())
    assert validate(config(hub="org/model"))["teacher"]["hub"] == "org/model"  # downloaded by the fetch job
    with pytest.raises(ConfigError, match="teacher.hub apply to teacher.source: diffusers only"):
        validate({"experiment": "x", "teacher": {"source": "train", "hub": "org/model"}})
    folder = save_tiny_teacher(tmp_path / "m", "epsilon", label_dim=10)
    cfg = validate(config(path=str(folder)))
    assert cfg["teacher"]["path"] == str(folder)
    net = load_teacher(folder)
    ref = wrap(*make_tiny_unet("epsilon", label_dim=10), label_dim=10)
    x, labels = torch.randn(2, 1, 8, 8), torch.eye(10)[:2]
    assert net.label_dim == 10 and net.img_resolution == 8 and net.img_channels == 1
    with torch.no_grad():
        assert torch.equal(net(x, 2.5, labels), ref(x, 2.5, labels))


def test_fetch_names_a_missing_folder_in_one_line(tmp_path):
    from stages.fetch import fetch

    cfg = {"experiment": "x", "teacher": {"source": "diffusers", "path": str(tmp_path / "nope"), "url": None}}
    with pytest.raises(AssetError, match=r"asset 'teacher' not available: .*nope does not exist; .* set teacher\.path"):
        fetch(cfg, tmp_path / "out")


def test_fetch_downloads_a_pipeline_folder_from_teacher_url(tmp_path):
    """teacher.url: the pipeline's files are fetched from the base URL into the cache, then imported."""
    import functools
    import http.server
    import threading

    from sida.io.checkpoints import load_network
    from stages.fetch import fetch

    src = save_tiny_teacher(tmp_path / "src", "sample")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(src))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        fetch({"experiment": "x", "teacher": {"source": "diffusers", "path": None, "url": url},
               "fetch": {"cache_dir": str(tmp_path / "cache")}}, tmp_path / "out")
    finally:
        srv.shutdown()
        srv.server_close()
    net = load_network(tmp_path / "out" / "teacher.pt")
    assert type(net).__name__ == "DiffusersVPPrecond" and net.prediction_type == "sample"
    assert (tmp_path / "cache" / "teacher" / "unet" / "config.json").is_file()


@pytest.mark.parametrize("run", ["mixed", "dmd2", "add"])
def test_distill_methods_run_unchanged_on_a_diffusers_teacher(run):
    """One critic (warm-up) and one method iteration of SiDA (the 'mixed' run's last phase), DMD2
    (its head on the mid block) and ADD (its heads on the teacher's encoder features)."""
    from helpers import baseline_runs, tiny_config
    from sida.io.data import open_dataset
    from sida.run import dist
    from sida.run.config import run_config, validate
    from sida.train.loop import DistillLoop
    from sida.train.nets import init_nets

    cfg = tiny_config(batch=4)
    cfg["distill"]["runs"].update(baseline_runs(iters=(1, 1), batch=4))
    cfg["distill"]["runs"]["dmd2"]["critic_ratio"] = 1  # the generator's turn on every iteration
    cfg = validate(cfg)
    rc = run_config(cfg, run)
    teacher = wrap(*make_tiny_unet("epsilon", label_dim=10), label_dim=10).requires_grad_(False)
    loop = DistillLoop(rc, init_nets(teacher, rc["dropout"]), open_dataset(cfg["data"]), dist.init("cpu", 0))
    g0 = [p.detach().clone() for p in loop.nets.G.parameters()]
    loop.step()
    loop.nimg = loop.phases[-1].end_nimg - loop.batch  # the method's own phase
    stats = loop.step()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values() if isinstance(v, (int, float)))
    assert any(not torch.equal(a, b) for a, b in zip(g0, loop.nets.G.parameters()))
