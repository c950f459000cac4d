"""Training an EDM teacher (the embedded default's, or anyone's own model to distil).

EDM's recipe: sigma ~ exp(N(P_mean, P_std)), loss lambda(sigma) ||D(x + n; sigma) - x||^2,
Adam with a learning-rate ramp-up, EMA with a ramped half-life. One iteration is `step`;
`sida.train.driver.run` drives ticks, checkpoints and resume.
"""

from __future__ import annotations

import copy

import torch

from ..io.data import ImageDataset
from ..run.dist import DistInfo
from ..nets.build import autocast
from .draws import make_generators, slot_generator
from .updates import accumulation, ema_update, make_optimizer, set_lr, sync_gradients, warmup_lr
from .losses import edm_denoising_loss
from ..nets.sampler import sample_sigma_lognormal


class TeacherLoop:
    """One EDM training iteration per `step`, with gradient accumulation across micro-batches."""

    def __init__(self, cfg: dict, net: torch.nn.Module, dataset: ImageDataset, info: DistInfo,
                 gens: dict[str, torch.Generator] | None = None, seed: int = 0) -> None:
        self.t = cfg["teacher"]
        self.sigma_data = cfg["network"]["sigma_data"]
        self.net = net.train().requires_grad_(True)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.dataset = dataset
        self.info = info
        self.device = info.device
        self.batch = self.t["batch"]
        self.micro, self.rounds = accumulation(self.batch, self.t["batch_per_proc"], info.world_size)
        self.gens = gens if gens is not None else make_generators(seed, info.rank, info.device, self.rounds)
        self.params = [p for p in net.parameters() if p.requires_grad]
        # EDM trains its teachers with Adam(0.9, 0.999), eps 1e-8.
        self.opt = make_optimizer(self.params, "adam", lr=self.t["lr"], betas=(0.9, 0.999), eps=1e-8)
        self.nimg = 0

    def phase_name(self) -> str:
        return "teacher"

    def lr(self) -> float:
        return warmup_lr(self.t["lr"], self.nimg, self.t["lr_rampup_kimg"])

    def step(self) -> dict[str, torch.Tensor]:
        set_lr(self.opt, self.lr())
        self.opt.zero_grad(set_to_none=True)
        total = self.micro * self.rounds
        loss_sum = torch.zeros((), device=self.device)
        for r in range(self.rounds):
            loss = self.micro_loss(r).sum() / total
            loss.backward()
            loss_sum += loss.detach()
        bad = sync_gradients(self.params, self.info.group)
        self.opt.step()
        ema_update(self.ema, self.net, self.nimg + self.batch, self.batch,
                   self.t["ema_halflife_kimg"], self.t["ema_rampup_ratio"])
        return {"loss": loss_sum, "nonfinite_grads": bad}

    def micro_loss(self, r: int) -> torch.Tensor:
        """The losses of accumulation round `r` (per pixel here: EDM's denoising loss at a log-normal
        sigma); `step` sums them and divides by the process batch. Subclasses with another
        objective override this (`sida.train.text_teacher`)."""
        idx = torch.randint(len(self.dataset), (self.micro,), generator=slot_generator(self.gens, "data", r))
        x, labels = self.dataset.get_batch(idx)
        x, labels = x.to(self.device), labels.to(self.device)
        g = slot_generator(self.gens, "noise", r)
        sigma = sample_sigma_lognormal(self.micro, self.t["P_mean"], self.t["P_std"], generator=g, device=self.device)
        n = torch.randn(x.shape, generator=g, device=self.device) * sigma
        with autocast(self.device, self.t["precision"]):
            denoised = self.net(x + n, sigma, labels)
        return edm_denoising_loss(denoised.float(), x, sigma, self.sigma_data)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "nimg": self.nimg}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.nimg = int(state["nimg"])
