"""What a trained SiDA discriminator can tell apart, by noise level.

    python -m bench.disc_probe --config results/E/config.yaml --state results/E/seed0/sida/state.pt \\
        [--samples 1024] [--seed 0] [--json out.json]

SiDA's discriminator is the fake score's encoder: its logits are the channel mean of the last
encoder stage's map, at every noise level the fake-score loss samples (sigma ~ exp(N(P_mean,
P_std))), and the generator's adversarial term asks it about x_g + sigma_t n with SiD's sigma_t.
When it separates real from generated images only at small sigma, most of the adversarial
signal is noise; this command measures that on a run's final fake score and EMA generator:

- per sigma band, over `--samples` real images and as many one-step samples with the same
  labels and the same noise: accuracy on real (logit > 0), on fake (logit < 0), their mean, and
  the BCE of each side (ln 2 = 0.693 is a coin);
- the share of the fake-score loss's sigma draws and of the generator's sigma_t draws that fall
  in each band (how much of the training signal each band gets);
- the logit map's shape (which resolution the logits come from).

Prints a table and, with --json, writes the numbers. CPU is fine: 8x8 networks take seconds.
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch
import torch.nn.functional as F

BANDS = (0.002, 0.05, 0.2, 0.5, 1.0, 2.0, 80.0)


def _band_index(sigma: torch.Tensor) -> torch.Tensor:
    edges = torch.tensor(BANDS[1:-1], dtype=sigma.dtype)
    return torch.bucketize(sigma, edges)


def band_shares(cfg: dict, n: int = 200_000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Share of sigma draws per band: the fake-score loss's log-normal and the generator's sigma_t."""
    from sida.nets.sampler import sid_sigma_t

    g = torch.Generator().manual_seed(seed)
    rc = cfg["distill"]
    s_fake = (torch.randn(n, generator=g) * rc["P_std"] + rc["P_mean"]).exp()
    s_gen = sid_sigma_t(torch.rand(n, generator=g) * rc["tmax"] / 1000)
    k = len(BANDS) - 1
    share = lambda s: (torch.bincount(_band_index(s), minlength=k).double() / n).tolist()  # noqa: E731
    return share(s_fake), share(s_gen)


@torch.no_grad()
def probe(cfg: dict, state_path: str, samples: int = 1024, seed: int = 0) -> dict:
    """Accuracies and BCE per sigma band of the run's final fake score on real vs generated images."""
    from sida.io.checkpoints import load_state, network_from_record
    from sida.io.data import open_dataset

    state = load_state(state_path)
    fake = network_from_record(state["fake"], "fake score").eval()
    G = network_from_record(state["G_ema"], "EMA generator").eval()
    data = open_dataset(cfg["data"])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(data), (samples,), generator=g)
    real, labels = data.get_batch(idx, generator=g)
    s0 = cfg["distill"]["sigma_init"]
    z = torch.randn(real.shape, generator=g)
    x_g = G(s0 * z, torch.full([samples], s0), labels).float()
    rows, shape = [], None
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        # log-uniform sigma inside the band, the same sigma and noise for real and fake
        u = torch.rand(samples, generator=g)
        sigma = (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp()
        n = torch.randn(real.shape, generator=g) * sigma.view(-1, 1, 1, 1)
        lr = fake(real + n, sigma, labels, return_flag="encoder").float()
        lf = fake(x_g + n, sigma, labels, return_flag="encoder").float()
        shape = list(lr.shape[1:])
        acc_r, acc_f = (lr > 0).float().mean().item(), (lf < 0).float().mean().item()
        rows.append({"band": [lo, hi], "acc_real": acc_r, "acc_fake": acc_f, "acc": (acc_r + acc_f) / 2,
                     "bce_real": F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)).item(),
                     "bce_fake": F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)).item()})
    share_fake, share_gen = band_shares(cfg, seed=seed)
    for r, a, b in zip(rows, share_fake, share_gen):
        r["share_fake_loss"], r["share_generator"] = a, b
    return {"state": str(state_path), "samples": samples, "logit_map": shape, "bands": rows}


def grad_split(cfg: dict, run: str, state_path: str, teacher_path: str, batch: int = 64, seed: int = 0,
               lambda_adv: float | None = None) -> dict:
    """The generator's gradient from each half of SiDA's objective on one batch, at the run's
    final G and fake score: 0.5 * lambda_sid * L_sid and 0.5 * lambda_adv * L_adv (DESIGN step 2,
    `sid_generator_objective`), their norms, ratio and cosine. `lambda_adv` None: the run's."""
    from sida.io.checkpoints import load_network, load_state, network_from_record
    from sida.nets.sampler import sid_sigma_t
    from sida.io.data import open_dataset
    from sida.run.config import run_config
    from sida.train.losses import sid_generator_terms

    rc = run_config(cfg, run)
    lam_adv = rc["lambda_adv"] if lambda_adv is None else lambda_adv
    state = load_state(state_path)
    G = network_from_record(state["G"], "generator").train()
    fake = network_from_record(state["fake"], "fake score").eval().requires_grad_(False)
    teacher = load_network(teacher_path).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    data = open_dataset(cfg["data"])
    _, labels = data.get_batch(torch.randint(len(data), (batch,), generator=g))
    s0 = rc["sigma_init"]
    shape = [batch, cfg["data"]["channels"], cfg["data"]["resolution"], cfg["data"]["resolution"]]
    x_g = G(s0 * torch.randn(shape, generator=g), torch.full([batch], s0), labels).float()
    sigma_t = sid_sigma_t(torch.rand([batch, 1, 1, 1], generator=g) * rc["tmax"] / 1000)
    x_t = x_g + sigma_t * torch.randn(shape, generator=g)
    y_real = teacher(x_t, sigma_t.flatten(), labels)
    y_fake, logits = fake(x_t, sigma_t.flatten(), labels, return_flag="encoder_decoder")
    l_sid, l_adv, _ = sid_generator_terms(y_real.float(), y_fake.float(), x_g, rc["alpha"], logits)
    params = [p for p in G.parameters() if p.requires_grad]
    terms = {"sid": 0.5 * rc["lambda_sid"] * l_sid.sum() / batch, "adv": 0.5 * lam_adv * l_adv.sum() / batch}
    flat = {}
    for k, loss in terms.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat[k] = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1) for p, gr in zip(params, grads)])
    n_sid, n_adv = flat["sid"].norm().item(), flat["adv"].norm().item()
    cos = (flat["sid"] @ flat["adv"]).item() / max(n_sid * n_adv, 1e-30)
    return {"state": str(state_path), "lambda_adv": lam_adv, "batch": batch, "grad_norm_sid": n_sid,
            "grad_norm_adv": n_adv, "ratio_adv_to_sid": n_adv / max(n_sid, 1e-30), "cosine": cos}


def _table(res: dict) -> str:
    head = f"{'sigma band':>14} {'acc real':>9} {'acc fake':>9} {'acc':>6} {'BCE real':>9} {'BCE fake':>9} " \
           f"{'fake-loss σ':>12} {'gen σ_t':>8}"
    lines = [f"{res['state']}: logit map {res['logit_map']} (channel mean of the last encoder stage), "
             f"{res['samples']} real + {res['samples']} generated per band", head]
    for r in res["bands"]:
        lo, hi = r["band"]
        lines.append(f"{lo:>6.3g}-{hi:<7.3g} {r['acc_real']:9.3f} {r['acc_fake']:9.3f} {r['acc']:6.3f} "
                     f"{r['bce_real']:9.3f} {r['bce_fake']:9.3f} {100 * r['share_fake_loss']:11.1f}% "
                     f"{100 * r['share_generator']:7.1f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from sida.run.config import load_config

    p = argparse.ArgumentParser(prog="python -m bench.disc_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the experiment's config (results/E/config.yaml)")
    p.add_argument("--state", required=True, nargs="+", help="state.pt of SiDA / SiD2A runs")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", nargs="+", help="with --teacher: the run name of each --state (its lambda_adv, alpha)")
    p.add_argument("--teacher", help="the teacher's network.pt: also split the generator's gradient into its SiD "
                                     "and adversarial halves (norms, ratio, cosine)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    out = [probe(cfg, s, args.samples, args.seed) for s in args.state]
    for res in out:
        print(_table(res))
    if args.teacher:
        if not args.run or len(args.run) != len(args.state):
            raise SystemExit("error: --teacher needs --run with one run name per --state")
        for res, s, run in zip(out, args.state, args.run):
            res["grad_split"] = grad_split(cfg, run, s, args.teacher, seed=args.seed)
            gs = res["grad_split"]
            print(f"{s}: generator gradient of 0.5*lambda_sid*L_sid {gs['grad_norm_sid']:.4g}, of "
                  f"0.5*lambda_adv*L_adv {gs['grad_norm_adv']:.4g} (lambda_adv {gs['lambda_adv']}): ratio "
                  f"{gs['ratio_adv_to_sid']:.3f}, cosine {gs['cosine']:+.3f}")
    if args.json:
        from sida.io.atomic import atomic_write_json

        atomic_write_json(args.json, out)


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
