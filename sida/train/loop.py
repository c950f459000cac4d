"""The distillation loop: SiD, SiDA, SiD2A and the DMD / DMD2 and ADD baselines as one loop over
phases that are data.

A run is a list of phases ({kind, kimg}) of one method (`sida.run.config.run_method`); the
method's class (`sida.train.methods`: SiD, DMD, ADD) holds its critic and generator objectives,
and `kind` says what an iteration trains:
- warmup: only the critic learns (the fake score and / or the run's discriminator);
- sid, sida: SiD's critic then generator; sida adds the SiDA adversarial term;
- dmd, dmd2: DMD2's generator (on its turn) then critic; dmd2 adds the GAN term;
- add: ADD's student (on its turn) then the heads.
The loop owns what every method shares: accumulation over micro-batch slots (each with its own
random streams, `sida.train.draws`), the optimiser (`optimizer` adam / adamw, betas, weight decay),
a linear lr warm-up (`lr_warmup_kimg`), gradient sync and clipping (`fake_clip` by value for runs
that train SiDA's discriminator, as the official SiDA loop does in every phase; `grad_clip` by
norm), EDM2's forced weight norm after each step, the critic / generator ratio (`critic_ratio`:
the generator updates every k-th iteration, each iteration counts `batch` images), the EMA (`ema:
false` keeps G_ema equal to G), and the checkpoint state. What the official SiD loops do and
this one does too: G and f_psi carry `dropout` and train in train mode (the teacher and G_ema
never do); labels of class-conditional runs come from dataset samples; `precision: fp16` runs
EDM's fp16 path in all networks (no gradient scaler; Adam eps 1e-6).
`parallel: fsdp` shards the networks over the processes (`sida.train.sharding`) once they are
built; the iteration is the same, with FSDP's averaged gradients in place of `sync_gradients`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..io.data import ImageDataset
from ..run.config import discriminator_kind, distill_defaults, resolve_run, run_method
from ..run.dist import DistInfo
from ..errors import CheckpointError
from ..io.sharded_checkpoint import Entries
from ..nets.edm2 import force_weight_norm_
from .augment import AugmentPipe
from .draws import Draws, make_generators
from .methods import method_class
from .methods.base import Slot, Stats, freeze, is_count, unfreeze
from .nets import Nets, prepare_networks
from .run_checks import check_run
from .sharding import shard_run, sync_sharded_gradients
from .updates import accumulation, ema_update, generator_turn, run_optimizers, set_lr, sync_gradients, warmup_lr


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


def run_settings(rc: dict, nets: Nets, dataset: ImageDataset | None) -> dict:
    """A run's settings with the schema's defaults (for a hand-made rc: tests, benchmarks),
    checked against its networks and data, and what follows from its teacher resolved."""
    rc = {**distill_defaults(), **rc}
    check_run(rc, nets, dataset)
    return resolve_run(rc, nets.teacher)


def run_draws(rc: dict, teacher: torch.nn.Module, gens: dict[str, torch.Generator], rounds: int, micro: int,
              device: torch.device, dataset: ImageDataset | None) -> Draws:
    """The run's random draws, shaped by its teacher (images, labels; prompts of a text teacher)."""
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    augment = AugmentPipe(rc["augment"]) if rc["augment"] > 0 else None
    return Draws(gens, rounds, micro, device, dataset, shape, teacher.label_dim, hasattr(teacher, "uncond"),
                 rc["precision"], augment)


class DistillLoop:
    """One distillation iteration per `step`; state for checkpoints in `state_dict`.

    `fused_optimizer`: torch's fused Adam / AdamW step (`make_optimizer`), the faster one
    (docs/performance.md); False gives torch's default step, for `bench.step --compare-unfused`.
    """

    def __init__(self, rc: dict, nets: Nets, dataset: ImageDataset | None, info: DistInfo,
                 gens: dict[str, torch.Generator] | None = None, sigma_data: float = 0.5,
                 seed: int = 0, fused_optimizer: bool = True) -> None:
        self.rc = rc = run_settings(rc, nets, dataset)
        self.nets, self.dataset, self.info, self.device = nets, dataset, info, info.device
        self.sigma_data, self.gen_sigmas, self.batch = sigma_data, rc["gen_sigmas"], rc["batch"]
        self.phases = build_phases(rc["phases"])
        self.total_nimg = self.phases[-1].end_nimg
        # The method (sid, dmd, add) decides what an iteration does; the discriminator kind what
        # the critic trains besides (or, for ADD, instead of) the fake score.
        self.method_name, self.disc = run_method(rc["phases"]), discriminator_kind(rc["discriminator"])
        self.micro, self.rounds = accumulation(self.batch, rc["batch_per_proc"], info.world_size)
        self.gens = gens if gens is not None else make_generators(seed, info.rank, info.device, self.rounds)
        prepare_networks(nets, rc)
        self.draws = run_draws(rc, nets.teacher, self.gens, self.rounds, self.micro, info.device, dataset)
        cls = method_class(self.method_name)
        self.method = cls(nets, self.draws, cls.Settings.from_run(rc), self.disc, sigma_data, self.gen_sigmas)
        # The critic's extra network (DMD2's head, ADD's heads), unless the run starts from a state
        # that holds one (`init_nets`). Weights from a private seed, so every process builds the
        # same head and the global RNG does not move.
        self.method.build_head(seed + 7, self.draws.img_shape, self.draws.label_dim, self.device)
        # `parallel: fsdp`: sharded once every network exists, before the optimisers take their parameters.
        self.mesh = shard_run(nets, rc, info.world_size, info.device)
        self.features_sha256: str | None = None  # ADD's DINOv2 weights (set by the stage), checked on resume
        # The critic: the fake score (SiD family, DMD) with DMD2's head, or ADD's heads alone.
        self.g_params, self.critic_params = list(nets.G.parameters()), self.method.critic_params()
        self.opt_g, self.opt_critic = run_optimizers(rc, self.g_params, self.critic_params, fused_optimizer)
        self.nimg = 0

    @property
    def img_shape(self) -> tuple[int, int, int]:
        return self.draws.img_shape

    @property
    def label_dim(self) -> int:
        return self.draws.label_dim

    @property
    def fake_clip(self) -> float | None:
        """The official SiDA loop clips the fake score's gradients in every phase of a run that
        trains the discriminator (warm-up and SiD stretch included); the SiD loop never clips."""
        return self.rc["fake_clip"] if self.disc == "sida" else None

    # -- schedule ---------------------------------------------------------------------------------
    def phase(self) -> Phase:
        for p in self.phases:
            if self.nimg < p.end_nimg:
                return p
        return self.phases[-1]

    def phase_name(self) -> str:
        return self.phase().kind

    def generator_turn(self) -> bool:
        """Whether this iteration updates the generator (every `critic_ratio`-th; a function of
        the image count, so a resumed run keeps the turn)."""
        return generator_turn(self.nimg, self.batch, self.rc["critic_ratio"])

    def _set_lrs(self) -> None:
        """`lr_warmup_kimg`: both learning rates ramp linearly with the run's images."""
        w = self.rc["lr_warmup_kimg"]
        if w > 0:
            set_lr(self.opt_g, warmup_lr(self.rc["lr_g"], self.nimg, w))
            if self.opt_critic is not None:
                set_lr(self.opt_critic, warmup_lr(self.rc["lr_fake"], self.nimg, w))

    # -- one iteration ----------------------------------------------------------------------------
    def step(self) -> Stats:
        """The critic's update and, on the generator's turn outside warm-up, the generator's and
        the EMA, in the method's order, on the slots' shared draws."""
        kind = self.phase().kind
        self._set_lrs()
        slots = [self.method.slot(r) for r in range(self.rounds)]
        stats: Stats = {}
        if not self.method.generator_first:
            stats.update(self.critic_update(slots))
        if kind != "warmup" and self.generator_turn():
            stats.update(self.generator_update(kind, slots))
            self.update_ema()
        if self.method.generator_first:
            stats.update(self.critic_update(slots))
        return stats

    def critic_update(self, slots: list[Slot] | None = None) -> Stats:
        """The critic's (fake score's and / or discriminator's) update on the generator's detached
        samples; the critic's networks train in train mode, the generator in eval mode. A run
        without a critic (ADD with `discriminator: none`) has nothing to update."""
        if self.opt_critic is None:
            return {}
        critic = self.method.critic_nets()
        unfreeze(*critic)
        self.nets.G.eval()
        stats = self._accumulate(self.method.critic_loss, slots, self.opt_critic)
        stats["nonfinite_fake"] = self.update(self.opt_critic, self.critic_params, critic, self.fake_clip)
        freeze(*critic)
        return stats

    def generator_update(self, kind: str, slots: list[Slot] | None = None) -> Stats:
        """The generator's update through the frozen teacher and critic."""
        unfreeze(self.nets.G)
        freeze(*self.method.critic_nets())
        stats = self._accumulate(lambda slot, r: self.method.generator_loss(kind, slot, r), slots, self.opt_g)
        stats["nonfinite_g"] = self.update(self.opt_g, self.g_params, [self.nets.G])
        freeze(self.nets.G)
        return stats

    def _accumulate(self, objective: Callable[[Slot, int], tuple[torch.Tensor, Stats]], slots: list[Slot] | None,
                    opt: torch.optim.Optimizer) -> Stats:
        """Backward of `objective(slot, r)` for every slot (the gradient of the process's batch,
        each loss already divided by it); returns the slots' stats as per-sample means over the
        process's batch: the sums added and divided by it once (counts summed only; `Stats`)."""
        opt.zero_grad(set_to_none=True)
        if slots is None:
            slots = [self.method.slot(r) for r in range(self.rounds)]
        zero = torch.zeros((), device=self.device)
        sums: Stats = {}
        for r, slot in enumerate(slots):
            loss, part = objective(slot, r)
            loss.backward()
            for k, v in part.items():
                sums[k] = sums.get(k, zero) + v.detach()
        return {k: v if is_count(k) else v / self.draws.total for k, v in sums.items()}

    def update(self, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], nets: list[torch.nn.Module],
               value_clip: float | None = None) -> torch.Tensor:
        """One optimiser step on accumulated gradients: average over processes (non-finite entries
        counted and replaced), clip by value (`fake_clip`) then by norm (`grad_clip`), step, and
        the networks' post-step (EDM2's forced weight norm). Returns the non-finite count."""
        # FSDP's backward already averaged the sharded gradients: only the non-finite ones remain.
        bad = (sync_gradients(params, self.info.group) if self.mesh is None
               else sync_sharded_gradients(params, self.mesh.get_group()))
        if value_clip is not None:
            torch.nn.utils.clip_grad_value_(params, value_clip)
        if self.rc["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(params, self.rc["grad_clip"])
        opt.step()
        for net in nets:
            self._post_step(net)
        opt.zero_grad(set_to_none=True)  # freed at once: the next pass builds its graph without them
        return bad

    def update_ema(self) -> None:
        """After a generator update: EMA of G, or, with `ema: false`, G_ema is a copy of G (so the
        raw generator is what is saved and evaluated, as DMD2 does)."""
        if self.rc["ema"]:
            ema_update(self.nets.G_ema, self.nets.G, self.nimg + self.batch, self.batch,
                       self.rc["ema_halflife_kimg"], self.rc["ema_rampup_ratio"])
        else:
            with torch.no_grad():
                for dst, src in zip(self.nets.G_ema.state_dict().values(), self.nets.G.state_dict().values()):
                    dst.copy_(src)

    def _post_step(self, net: torch.nn.Module) -> None:
        """After an optimiser step: forced weight normalisation of EDM2 layers (a no-op elsewhere)."""
        if self.rc["force_weight_norm"]:
            force_weight_norm_(net)

    # -- checkpoint state -------------------------------------------------------------------------
    def counters(self) -> dict:
        """The state besides networks and optimisers: the image count and ADD's feature weights' hash."""
        out: dict = {"nimg": self.nimg}
        if self.features_sha256 is not None:
            out["features_sha256"] = self.features_sha256
        return out

    def load_counters(self, state: dict) -> None:
        if state.get("features_sha256") != self.features_sha256:
            raise CheckpointError(f"the checkpoint was written with ADD features of sha256 {state.get('features_sha256')}, "
                                  f"this run's are {self.features_sha256}: restore those weights, or delete the "
                                  f"stage's work dir to start over")
        self.nimg = int(state["nimg"])

    def sharded_entries(self) -> Entries:
        """The networks and optimisers of a sharded checkpoint (`sida.io.sharded_checkpoint`): one
        module per optimiser, so the critic's fake score and head go together."""
        n = self.nets
        critic = torch.nn.ModuleDict({"fake": n.fake, **({"head": n.head} if n.head is not None else {})})
        return {"G": (n.G, self.opt_g), "G_ema": (n.G_ema, None), "critic": (critic, self.opt_critic)}

    def state_dict(self) -> dict:
        n = self.nets
        state = {"G": n.G.state_dict(), "G_ema": n.G_ema.state_dict(), "fake": n.fake.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "nimg": self.nimg}
        if self.opt_critic is not None:
            state["opt_f"] = self.opt_critic.state_dict()
        if n.head is not None:
            state["head"] = n.head.state_dict()
        return {**state, **self.counters()}

    def load_state_dict(self, state: dict) -> None:
        n = self.nets
        self.load_counters(state)
        n.G.load_state_dict(state["G"])
        n.G_ema.load_state_dict(state["G_ema"])
        n.fake.load_state_dict(state["fake"])
        if n.head is not None:
            n.head.load_state_dict(state["head"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_critic is not None:
            self.opt_critic.load_state_dict(state["opt_f"])
