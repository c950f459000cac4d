"""The distillation loop: SiD, SiDA and SiD2A as one loop over phases that are data.

A run is a list of phases ({kind, kimg}); `kind` decides what an iteration does:
- warmup: only the fake score f_psi (and, if the run trains one, the discriminator) learns;
- sid:    f_psi step, then the generator step on lambda_sid * L_sid;
- sida:   as sid, but the generator minimises 0.5 lambda_sid L_sid + 0.5 lambda_adv L_adv and
          the fake score's gradients are clipped by value (SiDA Section 4).
SiD2A is a run whose generator starts from a SiD generator (`init_generator`).
Each iteration (DESIGN.md): 1. fake-score (+discriminator) update on x_g.detach();
2. generator update through frozen teacher and fake score; 3. EMA of G.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..io.data import ImageDataset
from ..run.dist import DistInfo
from ..errors import ConfigError
from ..io.factory import autocast
from .loop import accumulation, ema_update, make_adam, make_generators, slot_generator, sync_gradients
from .losses import (adversarial_generator_loss, discriminator_loss, edm_denoising_loss, edm_loss_weight,
                     fake_score_objective, generator_objective, sid_generator_loss, sid_weight_factor)
from ..nets.sampler import sid_sigma_t


@dataclass(frozen=True)
class Phase:
    """A phase of a run: its kind and the image count (within the run) where it ends."""

    kind: str
    end_nimg: int


def build_phases(phases: list[dict]) -> list[Phase]:
    """Cumulative phase boundaries from the config's [{kind, kimg}, ...]."""
    out, end = [], 0
    for p in phases:
        end += int(round(p["kimg"] * 1000))
        out.append(Phase(p["kind"], end))
    return out


@dataclass
class Nets:
    """The networks of a distillation run. The teacher is frozen; G_ema is G's EMA."""

    teacher: torch.nn.Module
    G: torch.nn.Module
    G_ema: torch.nn.Module
    fake: torch.nn.Module


def fake_forward(fake: torch.nn.Module, x_fake: torch.Tensor, x_real: torch.Tensor | None,
                 sigma: torch.Tensor, labels: torch.Tensor, discriminator: bool):
    """f_psi on noisy fakes (denoised + logits) and, for the discriminator, on noisy reals (logits).

    Both encoder passes run as one batched pass: the network decodes only the fake half
    (`decode_first`), so the real images cost an encoder pass and nothing more.
    Returns (denoised_fake, logits_fake | None, logits_real | None).
    """
    if not discriminator:
        return fake(x_fake, sigma, labels), None, None
    b = x_fake.shape[0]
    x = torch.cat([x_fake, x_real])
    denoised, logits = fake(x, torch.cat([sigma, sigma]), torch.cat([labels, labels]),
                            return_flag="encoder_decoder", decode_first=b)
    return denoised, logits[:b], logits[b:]


class DistillLoop:
    """One SiD/SiDA iteration per `step`; state for checkpoints in `state_dict`."""

    def __init__(self, rc: dict, nets: Nets, dataset: ImageDataset | None, info: DistInfo,
                 gens: dict[str, torch.Generator] | None = None, sigma_data: float = 0.5,
                 seed: int = 0) -> None:
        self.rc = rc
        self.nets = nets
        self.dataset = dataset
        self.info = info
        self.device = info.device
        self.sigma_data = sigma_data
        self.phases = build_phases(rc["phases"])
        self.total_nimg = self.phases[-1].end_nimg
        self.discriminator = bool(rc["discriminator"])
        if self.discriminator and dataset is None:
            raise ConfigError("a run with discriminator: true needs real images: configure `data`")
        self.batch = rc["batch"]
        self.micro, self.rounds = accumulation(self.batch, rc["batch_per_proc"], info.world_size)
        self.gens = gens if gens is not None else make_generators(seed, info.rank, info.device, self.rounds)
        ref = nets.teacher
        self.img_shape = (ref.img_channels, ref.img_resolution, ref.img_resolution)
        self.label_dim = ref.label_dim
        nets.teacher.eval().requires_grad_(False)
        nets.G_ema.eval().requires_grad_(False)
        if rc.get("channels_last"):
            # NHWC weights make every convolution (and, from the first one on, every activation)
            # channels-last: oneDNN's native layout, ~10% faster per iteration on the CPU at
            # 32x32 (bench.step). Inputs stay NCHW: the first conv switches the layout.
            for net in (nets.teacher, nets.G, nets.G_ema, nets.fake):
                net.to(memory_format=torch.channels_last)
        # Activation checkpointing of the generator's blocks in the generator step (a memory
        # option for large networks on a GPU: the block forwards run twice).
        if rc.get("checkpoint_generator"):
            getattr(nets.G, "model", nets.G).checkpoint_blocks = True
        if rc.get("compile"):
            # torch.compile of the networks an iteration runs (G_ema only samples). In place, so
            # state-dict keys stay as they are; static shapes: each call site (batch, return
            # flag, grad mode) gets its own graph once, instead of a dynamic-shape recompile.
            # The three share EDMPrecond.forward, whose compiled variants count against one
            # recompile limit (8 by default): an iteration alone needs about 5.
            from torch import _dynamo

            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            for net in (nets.teacher, nets.G, nets.fake):
                net.compile(dynamic=False)
        self.g_params = list(nets.G.parameters())
        self.f_params = list(nets.fake.parameters())
        self.opt_g = make_adam(self.g_params, rc["lr_g"], rc["adam_eps"])
        self.opt_f = make_adam(self.f_params, rc["lr_fake"], rc["adam_eps"])
        self.nimg = 0

    # -- schedule ---------------------------------------------------------------------------------
    def phase(self) -> Phase:
        for p in self.phases:
            if self.nimg < p.end_nimg:
                return p
        return self.phases[-1]

    def phase_name(self) -> str:
        return self.phase().kind

    # -- random draws (all from this rank's generators) --------------------------------------------
    def _labels(self, n: int, r: int) -> torch.Tensor:
        if self.label_dim == 0:
            return torch.zeros([n, 0], device=self.device)
        idx = torch.randint(self.label_dim, (n,), generator=slot_generator(self.gens, "data", r))
        return F.one_hot(idx, self.label_dim).float().to(self.device)

    def _real(self, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real images with their labels; the generator is then conditioned on the same labels."""
        idx = torch.randint(len(self.dataset), (n,), generator=slot_generator(self.gens, "data", r))
        x, labels = self.dataset.get_batch(idx)
        return x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _randn(self, shape, r: int) -> torch.Tensor:
        return torch.randn(shape, generator=slot_generator(self.gens, "noise", r), device=self.device)

    def _rand(self, shape, r: int) -> torch.Tensor:
        return torch.rand(shape, generator=slot_generator(self.gens, "noise", r), device=self.device)

    def _generate(self, labels: torch.Tensor, r: int) -> torch.Tensor:
        """x_g = G(sigma_init z, sigma_init) with zero augment labels (the one-step convention)."""
        n = labels.shape[0]
        z = self._randn([n, *self.img_shape], r)
        s = self.rc["sigma_init"]
        return self.nets.G(s * z, torch.full([n], s, device=self.device), labels)

    # -- the two updates --------------------------------------------------------------------------
    def fake_step(self, kind: str) -> dict[str, torch.Tensor]:
        """Fake-score (+discriminator) update on x_g.detach() (DESIGN.md step 1)."""
        nets, rc = self.nets, self.rc
        nets.fake.train().requires_grad_(True)
        nets.G.eval()
        self.opt_f.zero_grad(set_to_none=True)
        total = self.micro * self.rounds
        stats = {"loss_fake": torch.zeros((), device=self.device)}
        if self.discriminator:
            stats.update(loss_d=torch.zeros((), device=self.device), d_acc=torch.zeros((), device=self.device))
        for r in range(self.rounds):
            if self.discriminator:
                real, labels = self._real(self.micro, r)
            else:
                real, labels = None, self._labels(self.micro, r)
            with torch.no_grad(), autocast(self.device, rc["precision"]):
                x_g = self._generate(labels, r)
            x_g = x_g.float()
            sigma = (self._randn([self.micro, 1, 1, 1], r) * rc["P_std"] + rc["P_mean"]).exp()
            n = self._randn(x_g.shape, r) * sigma
            with autocast(self.device, rc["precision"]):
                denoised, lf, lr = fake_forward(nets.fake, x_g + n, None if real is None else real + n,
                                                sigma.flatten(), labels, self.discriminator)
            l_fake = edm_denoising_loss(denoised.float(), x_g, sigma, self.sigma_data)
            l_d = None
            if self.discriminator:
                l_d = discriminator_loss(lr, lf, edm_loss_weight(sigma, self.sigma_data))
                stats["loss_d"] += (l_d.sum() / total).detach()
                acc = ((lr.detach() > 0).float().mean() + (lf.detach() < 0).float().mean()) / 2
                stats["d_acc"] += acc / self.rounds
            loss = fake_score_objective(l_fake, l_d, total, rc["lambda_d"])
            loss.backward()
            stats["loss_fake"] += (l_fake.sum() / total).detach()
        stats["nonfinite_fake"] = sync_gradients(self.f_params)
        if kind == "sida":
            torch.nn.utils.clip_grad_value_(self.f_params, rc["fake_clip"])
        self.opt_f.step()
        self.opt_f.zero_grad(set_to_none=True)  # freed before the generator step's graph is built
        nets.fake.eval().requires_grad_(False)
        return stats

    def generator_step(self, kind: str) -> dict[str, torch.Tensor]:
        """Generator update through the frozen teacher and fake score (DESIGN.md step 2)."""
        nets, rc = self.nets, self.rc
        adversarial = kind == "sida"
        nets.G.train().requires_grad_(True)
        nets.fake.eval().requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        total = self.micro * self.rounds
        stats = {"loss_g_sid": torch.zeros((), device=self.device)}
        if adversarial:
            stats["loss_g_adv"] = torch.zeros((), device=self.device)
        for r in range(self.rounds):
            labels = self._labels(self.micro, r)
            with autocast(self.device, rc["precision"]):
                x_g = self._generate(labels, r).float()
                t = self._rand([self.micro, 1, 1, 1], r)
                sigma_t = sid_sigma_t(t * rc["tmax"] / 1000)
                x_t = x_g + sigma_t * self._randn(x_g.shape, r)
                y_real = nets.teacher(x_t, sigma_t.flatten(), labels)
                if adversarial:
                    y_fake, logits = nets.fake(x_t, sigma_t.flatten(), labels, return_flag="encoder_decoder")
                else:
                    y_fake, logits = nets.fake(x_t, sigma_t.flatten(), labels), None
            y_real, y_fake = y_real.float(), y_fake.float()
            l_sid = sid_generator_loss(y_real, y_fake, x_g, rc["alpha"])
            l_adv = None
            if adversarial:
                l_adv = adversarial_generator_loss(logits, sid_weight_factor(x_g, y_real), x_g.shape)
                stats["loss_g_adv"] += (l_adv.sum() / total).detach()
            loss = generator_objective(l_sid, l_adv, rc["lambda_sid"], rc["lambda_adv"], total, adversarial)
            loss.backward()
            stats["loss_g_sid"] += (l_sid.sum() / total).detach()
        stats["nonfinite_g"] = sync_gradients(self.g_params)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        nets.G.eval().requires_grad_(False)
        return stats

    def step(self) -> dict[str, torch.Tensor]:
        kind = self.phase().kind
        stats = self.fake_step(kind)
        if kind != "warmup":
            stats.update(self.generator_step(kind))
            ema_update(self.nets.G_ema, self.nets.G, self.nimg + self.batch, self.batch,
                       self.rc["ema_halflife_kimg"], self.rc["ema_rampup_ratio"])
        return stats

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        n = self.nets
        return {"G": n.G.state_dict(), "G_ema": n.G_ema.state_dict(), "fake": n.fake.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_f": self.opt_f.state_dict(), "nimg": self.nimg}

    def load_state_dict(self, state: dict) -> None:
        n = self.nets
        n.G.load_state_dict(state["G"])
        n.G_ema.load_state_dict(state["G_ema"])
        n.fake.load_state_dict(state["fake"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
        self.nimg = int(state["nimg"])


def init_nets(teacher: torch.nn.Module, fake_dropout: float | None, init_state: dict | None = None,
              init_generator: torch.nn.Module | None = None) -> Nets:
    """The run's networks: G and f_psi from the teacher, or from a previous run's final state;
    G (and its EMA) from another run's EMA generator for SiD2A."""
    from ..io.checkpoints import network_from_record
    from ..io.factory import clone_with_dropout

    device = next(teacher.parameters()).device
    if init_state is not None:
        G = network_from_record(init_state["G"], "init state").to(device)
        G_ema = network_from_record(init_state["G_ema"], "init state").to(device)
        fake = clone_with_dropout(network_from_record(init_state["fake"], "init state").to(device), fake_dropout)
    else:
        G = copy.deepcopy(teacher)
        G_ema = copy.deepcopy(teacher)
        fake = clone_with_dropout(teacher, fake_dropout)
    if init_generator is not None:
        G = copy.deepcopy(init_generator).to(device)
        G_ema = copy.deepcopy(init_generator).to(device)
    return Nets(teacher=teacher, G=G.requires_grad_(True), G_ema=G_ema, fake=fake)
