"""What every distillation method shares: the `Method` interface the loop drives, and small
helpers (`freeze`, `unfreeze`, `disc_accuracy`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # annotations only: the loop imports the methods, never the other way round
    from ..nets import Nets
    from ..draws import Draws

Stats = dict[str, torch.Tensor]
"""What an objective reports for its slot, one scalar tensor per name: a sum over the slot's
samples (a loss: the per-sample values summed; an accuracy: each sample's share of correct
logits, summed). The loop (`DistillLoop._accumulate`) detaches them, adds the slots' sums and
divides by the process batch (`Draws.total`) once, so every logged stat is a per-sample mean over
the iteration. Names in `COUNTS` (`dropped_*`: samples left out for a NaN; `nonfinite_*`:
non-finite gradient entries) are counts and are logged as summed, undivided."""
Slot = dict[str, Any]

COUNTS = ("dropped_", "nonfinite_")


def is_count(name: str) -> bool:
    """Whether stat `name` is a count (summed, never divided by the batch): see `Stats`."""
    return name.startswith(COUNTS)


@dataclass(frozen=True)
class Settings:
    """A method's own settings (subclasses list them as fields), built once from the run config:
    a method reads nothing else of it, as EDM2's loss class takes only its own arguments."""

    @classmethod
    def from_run(cls, rc: dict) -> "Settings":
        return cls(**{f.name: rc[f.name] for f in fields(cls)})


class Method:
    """A distillation method's two objectives, per micro-batch slot, as EDM2's loss class is.

    The loop (`sida.train.loop.DistillLoop`) calls, every iteration and for every slot r,
    `slot(r)` first (draws that both objectives of the iteration share), then the objectives in
    the method's order (`generator_first`): `critic_loss(slot, r)` on the critic's turn (every
    iteration) and `generator_loss(kind, slot, r)` on the generator's. Each returns (the scalar
    to backpropagate, already divided by the process batch; this slot's `Stats`, sums); the loop
    backpropagates, turns the stats into means, and does the rest: gradient sync, clipping, the optimiser steps, weight norm, EMA,
    modes (`critic_nets` train in the critic's update and are frozen in the generator's).
    A generator objective that the critic reuses (DMD2, ADD: the critic trains on the generator's
    detached samples of the same iteration) keeps them in the slot.
    """

    name = ""
    generator_first = False
    Settings: type[Settings] = Settings

    def __init__(self, nets: "Nets", draws: "Draws", settings: Settings, disc: str, sigma_data: float,
                 gen_sigmas: list[float]) -> None:
        self.nets, self.draws, self.settings, self.disc = nets, draws, settings, disc
        self.sigma_data = sigma_data
        self.gen_sigmas = gen_sigmas

    def generate(self, labels: torch.Tensor, r: int) -> torch.Tensor:
        """x_g = G(sigma_init z, sigma_init) with slot r's noise z (the one-step convention;
        sigma_init is the first generation sigma)."""
        n, s = labels.shape[0], self.gen_sigmas[0]
        z = self.draws.randn([n, *self.draws.img_shape], r)
        return self.nets.G(s * z, torch.full([n], s, device=z.device), labels)

    def generated(self, slot: Slot, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The generator's detached samples of this iteration, kept in the slot by a generator
        objective that runs first (DMD2, ADD), or, on an off-turn iteration, `draw()` now without
        gradient (the critic still trains on fresh samples)."""
        x = slot.get("x_g")
        if x is None:
            with torch.no_grad(), self.draws.autocast():
                x = draw().float()
        return x

    def build_head(self, seed: int, img_shape: tuple[int, int, int], label_dim: int, device: torch.device) -> None:
        """Give `nets.head` the critic's extra network, if the method's discriminator has one
        (keeping one loaded from a previous run's state): none by default."""
        self.nets.head = None

    def critic_nets(self) -> list[torch.nn.Module]:
        """The networks the critic trains: the fake score and, if any, the head."""
        return [net for net in (self.nets.fake, self.nets.head) if net is not None]

    def critic_params(self) -> list[torch.nn.Parameter]:
        return [p for net in self.critic_nets() for p in net.parameters()]

    def slot(self, r: int) -> Slot:
        """Draws shared by the iteration's two objectives in slot r (none by default)."""
        return {}

    def critic_loss(self, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def generator_loss(self, kind: str, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError


def freeze(*nets: torch.nn.Module | None) -> None:
    for net in nets:
        if net is not None:
            net.eval().requires_grad_(False)


def unfreeze(*nets: torch.nn.Module | None) -> None:
    for net in nets:
        if net is not None:
            net.train().requires_grad_(True)


def disc_accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> Stats:
    """The discriminator's accuracy as `Stats` sums: per sample, the share of its real logits > 0
    and of its fake logits < 0, summed over the slot's samples; logged separately (a
    discriminator that calls everything real, or fake, averages 0.5 but shows 1 and 0 here)."""
    def correct(hits: torch.Tensor) -> torch.Tensor:
        return hits.float().reshape(hits.shape[0], -1).mean(dim=1).sum()

    return {"d_acc_real": correct(logits_real > 0), "d_acc_fake": correct(logits_fake < 0)}
