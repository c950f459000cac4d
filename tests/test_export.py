"""Exported generators (issue 26): `python -m stages.export` writes safetensors + generator.json
(+ a diffusers UNet2DModel folder for diffusers teachers) and `sida.load_generator` gives back
the same images as the network file the distill stage wrote. A few seconds."""

from __future__ import annotations

import json

import pytest
import torch

from diffusers_assets import make_tiny_unet
from test_diffusers_teacher import wrap


def _export(tmp_path, net, meta):
    from sida.io.checkpoints import load_network, save_network
    from stages.export import main

    save_network(tmp_path / "network.pt", net, meta=meta)
    main(["--network", str(tmp_path / "network.pt"), "--out", str(tmp_path / "export")])
    return load_network(tmp_path / "network.pt")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_diffusers_generator_round_trip(tmp_path, pred):
    """Bit-identical through sida.load_generator (the same tensors through the same code, in the
    same process); to float tolerance through diffusers' own UNet2DModel.forward and the README's
    formula (it looks the class embedding up where we multiply one-hot vectors into its table)."""
    import sida
    from diffusers import UNet2DModel

    from sida.nets.sampler import one_step_generate

    stored = _export(tmp_path, wrap(*make_tiny_unet(pred, label_dim=10), label_dim=10),
                     {"gen_sigmas": [2.5], "sigma_init": 2.5, "one_step": True, "run": "sid"})
    G = sida.load_generator(tmp_path / "export")
    assert G.sigma_init == 2.5 and G.label_dim == 10 and G.img_shape == (1, 8, 8)
    z, classes = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 5, 9])
    with torch.no_grad():
        ref = one_step_generate(stored, z, torch.nn.functional.one_hot(classes, 10).float(), sigma_init=2.5)
    assert torch.equal(G(z, classes), ref)
    one = json.loads((tmp_path / "export" / "unet" / "sida_one_step.json").read_text())
    assert one == json.loads((tmp_path / "export" / "generator.json").read_text())["diffusers_one_step"]
    unet = UNet2DModel.from_pretrained(tmp_path / "export" / "unet", low_cpu_mem_usage=False).eval()
    x = one["sigma_init"] * z
    with torch.no_grad():
        F = unet(one["c_in"] * x, torch.full([4], one["timestep"]), classes).sample
    torch.testing.assert_close(one["c_skip"] * x + one["c_out"] * F, ref, atol=1e-5, rtol=1e-5)
    assert "images = G(z, labels=" in (tmp_path / "export" / "README.md").read_text()


def test_edm_generator_round_trip_and_errors(tmp_path):
    import sida
    from sida.errors import CheckpointError, ConfigError
    from sida.nets.build import build_network
    from sida.nets.sampler import one_step_generate

    net = build_network("EDMPrecond", dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet",
                                           model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    stored = _export(tmp_path, net, {"gen_sigmas": [1.5], "sigma_init": 1.5, "one_step": True})
    G = sida.load_generator(tmp_path / "export" / "generator.json")
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(G(z), one_step_generate(stored, z, None, sigma_init=1.5))
    assert not (tmp_path / "export" / "unet").exists()
    with pytest.raises(CheckpointError, match="is not an exported generator"):
        sida.load_generator(tmp_path)
    from sida.io.checkpoints import save_network
    from stages.export import main

    save_network(tmp_path / "teacher.pt", net, meta={})
    with pytest.raises(ConfigError, match="is not a distilled generator"):
        main(["--network", str(tmp_path / "teacher.pt"), "--out", str(tmp_path / "t")])
