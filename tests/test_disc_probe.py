"""bench.disc_probe: the share of sigma draws per band (analytic), and a probe of a tiny state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.disc_probe import BANDS, band_shares, probe
from tests.helpers import tiny_config


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_band_shares_follow_the_two_sigma_distributions():
    from sida.run.config import validate

    cfg = validate(copy.deepcopy(tiny_config()))
    fake, gen = band_shares(cfg, n=400_000)
    assert sum(fake) == pytest.approx(1.0) and sum(gen) == pytest.approx(1.0)
    # The fake-score loss: ln sigma ~ N(P_mean, P_std) = N(-1.2, 1.2).
    cdf = [_phi((math.log(b) + 1.2) / 1.2) for b in BANDS]
    want = [cdf[i + 1] - cdf[i] for i in range(len(BANDS) - 1)]
    want[0] += cdf[0]; want[-1] += 1 - cdf[-1]  # noqa: E702  (tails fall in the outer bands)
    assert fake == pytest.approx(want, abs=0.004)
    # The generator: sigma_t = (a + (1 - t)(b - a))^7 with t ~ U[0, 0.8], a = 80^(1/7), b = 0.002^(1/7):
    # P(sigma_t <= s) = P(t <= 1 - (s^(1/7) - a)/(b - a)... ) = (1 - (s^(1/7) - a) / (b - a)) / 0.8 on [0.002, 24.3].
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    g_cdf = [min(1.0, max(0.0, (1 - (s ** (1 / 7) - a) / (b - a)) / 0.8)) for s in BANDS]
    g_want = [g_cdf[i + 1] - g_cdf[i] for i in range(len(BANDS) - 1)]
    assert gen == pytest.approx(g_want, abs=0.004)


def test_probe_of_a_state_reports_every_band_and_the_logit_map(tmp_path):
    from sida.io import checkpoints
    from sida.nets.build import network_from_config
    from sida.run.config import validate

    cfg = validate(copy.deepcopy(tiny_config()))
    torch.manual_seed(0)
    net = network_from_config(cfg)
    path = tmp_path / "state.pt"
    checkpoints.save_state(path, {"G_ema": checkpoints.network_record(net), "fake": checkpoints.network_record(net)})
    res = probe(cfg, str(path), samples=32)
    # 8x8 input, channel_mult [1, 2]: the encoder ends at 4x4, one logit channel (the channel mean)
    assert res["logit_map"] == [1, 4, 4]
    assert [r["band"] for r in res["bands"]] == [list(p) for p in zip(BANDS[:-1], BANDS[1:])]
    for r in res["bands"]:
        assert 0 <= r["acc_real"] <= 1 and 0 <= r["acc_fake"] <= 1 and r["acc"] == pytest.approx(
            (r["acc_real"] + r["acc_fake"]) / 2)
        assert r["bce_real"] > 0 and r["bce_fake"] > 0


def test_grad_split_scales_with_lambda_adv_and_leaves_the_sid_half_alone(tmp_path):
    from bench.disc_probe import grad_split
    from sida.io import checkpoints
    from sida.nets.build import network_from_config
    from sida.run.config import validate

    cfg = validate(copy.deepcopy(tiny_config()))
    torch.manual_seed(0)
    G, fake = network_from_config(cfg), network_from_config(cfg)
    state = tmp_path / "state.pt"
    checkpoints.save_state(state, {"G": checkpoints.network_record(G), "fake": checkpoints.network_record(fake)})
    teacher = tmp_path / "teacher.pt"
    checkpoints.save_network(teacher, network_from_config(cfg), meta={"stage": "test"})
    a, b = (grad_split(cfg, "mixed", str(state), str(teacher), batch=8, lambda_adv=lam) for lam in (0.1, 0.2))
    assert a["grad_norm_sid"] == pytest.approx(b["grad_norm_sid"], rel=1e-6) and a["grad_norm_sid"] > 0
    assert b["grad_norm_adv"] == pytest.approx(2 * a["grad_norm_adv"], rel=1e-5) and a["grad_norm_adv"] > 0
    assert b["cosine"] == pytest.approx(a["cosine"], abs=1e-5) and -1 <= a["cosine"] <= 1
    assert grad_split(cfg, "mixed", str(state), str(teacher), batch=8, lambda_adv=0.0)["grad_norm_adv"] == 0
