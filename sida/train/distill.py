"""The distillation loop: SiD, SiDA, SiD2A and the DMD / DMD2 and ADD baselines as one loop over
phases that are data.

A run is a list of phases ({kind, kimg}); `kind` decides what an iteration does:
- warmup: only the critic learns (the fake score and / or the run's discriminator);
- sid:    f_psi step, then the generator step on lambda_sid * L_sid;
- sida:   as sid, but the generator minimises 0.5 lambda_sid L_sid + 0.5 lambda_adv L_adv;
- dmd, dmd2: DMD2's iteration (generator on its turn, then the fake score and, with the
          `dmd2_head` discriminator, its classifier); dmd2 adds the GAN term to the generator;
- add:    ADD's iteration (student on real images noised at its levels, then the heads).
The DMD and ADD iterations live in `sida.train.baseline_steps`; a run's phases belong to one
method. SiD2A is a run whose generator starts from a SiD generator (`init_generator`). Every
setting comes from the run's merged config (`sida.run.config.run_config`), so a run can change any
of them. Shared by every method: the optimiser (`optimizer` adam / adamw, betas, weight decay),
a linear lr warm-up (`lr_warmup_kimg`), gradient-norm clipping (`grad_clip`), the critic /
generator ratio (`critic_ratio`: the generator updates every k-th iteration, each iteration
counts `batch` images) and the EMA (`ema: false` keeps G_ema equal to G). What the official SiD
loops do and this one does too:
- a run that trains the SiDA discriminator clips the fake score's gradients by value (`fake_clip`)
  in every phase; others never clip by value;
- the fake score sees augmented inputs (`augment`, EDM's pipe with its 9 labels; generated and
  real images drawn independently); the generator step is never augmented;
- G and f_psi carry `dropout` and train in train mode (the teacher and G_ema never do);
- labels of class-conditional runs come from dataset samples (the dataset's class frequencies);
- a sample holding a NaN is dropped from its loss, gradients pass through nan_to_num;
- `precision: fp16` runs EDM's fp16 path in all networks (no gradient scaler; Adam eps 1e-6).
Each SiD-family iteration (docs/design.md): 1. fake-score (+discriminator) update on x_g.detach();
2. generator update through frozen teacher and fake score; 3. EMA of G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..io.data import ImageDataset
from ..run.config import discriminator_kind, distill_defaults, generation_sigmas, run_method
from ..run.dist import DistInfo
from ..errors import CheckpointError, ConfigError
from ..io.factory import autocast
from .augment import AUGMENT_DIM, AugmentPipe
from .baseline_steps import add_iteration, dmd_iteration
from .baselines import generator_turn, make_optimizer, warmup_lr
from .loop import accumulation, ema_update, make_generators, set_lr, slot_generator, sync_gradients
from .losses import fake_score_losses, fake_score_objective, generator_losses, generator_objective
from ..nets.sampler import sid_sigma_t
from ..nets.edm2 import force_weight_norm_
from ..nets.heads import ADDHeads, DMD2Head, add_heads_for, dmd2_head_for, head_from_record


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
    head: torch.nn.Module | None = None      # DMD2's classifier head or ADD's heads (trained by the critic)
    features: torch.nn.Module | None = None  # ADD's frozen feature network (not trained, not stored)


def fake_forward(fake: torch.nn.Module, x_fake: torch.Tensor, x_real: torch.Tensor | None,
                 sigma: torch.Tensor, labels: torch.Tensor, discriminator: bool,
                 augment_labels: tuple[torch.Tensor, torch.Tensor | None] | None = None):
    """f_psi on noisy fakes (denoised + logits) and, for the discriminator, on noisy reals (logits).

    Both encoder passes run as one batched pass: the network decodes only the fake half
    (`decode_first`), so the real images cost an encoder pass and nothing more.
    `augment_labels`: (fake's, real's or None) augmentation labels, None when not augmenting.
    Returns (denoised_fake, logits_fake | None, logits_real | None).
    """
    aug_fake, aug_real = augment_labels if augment_labels is not None else (None, None)
    if not discriminator:
        return fake(x_fake, sigma, labels, augment_labels=aug_fake), None, None
    b = x_fake.shape[0]
    x = torch.cat([x_fake, x_real])
    aug = None if aug_fake is None else torch.cat([aug_fake, aug_real])
    denoised, logits = fake(x, torch.cat([sigma, sigma]), torch.cat([labels, labels]), augment_labels=aug,
                            return_flag="encoder_decoder", decode_first=b)
    return denoised, logits[:b], logits[b:]


def apply_precision(nets: "Nets", precision: str) -> None:
    """Set every network's compute dtype for the run's `precision`, as the official code does.

    fp16: EDM's `use_fp16` path in all networks (the UNet blocks in fp16, fp32 master weights,
    embedding and output in fp32); G, G_ema and f_psi are marked use_fp16 like the official
    ones (their network files then sample in fp16 on CUDA, as the authors' pickles do).
    fp32 and bf16: the UNets take fp32 inputs (bf16 then comes from torch.autocast), even for a
    teacher published with use_fp16 (the official code builds all three networks with --fp16).
    Networks without EDM preconditioning (analytic test doubles) are left alone.
    """
    dtype = torch.float16 if precision == "fp16" else torch.float32
    for name in ("teacher", "G", "G_ema", "fake"):
        net = getattr(nets, name)
        if not hasattr(net, "unet_dtype"):
            continue
        net.compute_dtype = dtype
        if name != "teacher":
            net.use_fp16 = precision == "fp16"
            net.init_kwargs["use_fp16"] = net.use_fp16


class DistillLoop:
    """One SiD/SiDA iteration per `step`; state for checkpoints in `state_dict`."""

    def __init__(self, rc: dict, nets: Nets, dataset: ImageDataset | None, info: DistInfo,
                 gens: dict[str, torch.Generator] | None = None, sigma_data: float = 0.5,
                 seed: int = 0) -> None:
        rc = {**distill_defaults(), **rc}  # a hand-made rc (tests, benchmarks) gets the schema's defaults
        if rc["adam_eps"] is None:
            rc["adam_eps"] = 1e-6 if rc["precision"] == "fp16" else 1e-8
        self.rc = rc
        self.nets = nets
        self.dataset = dataset
        self.info = info
        self.device = info.device
        self.sigma_data = sigma_data
        self.phases = build_phases(rc["phases"])
        self.total_nimg = self.phases[-1].end_nimg
        # The method (sid, dmd, add) decides what an iteration does; the discriminator kind what
        # the critic trains besides (or, for ADD, instead of) the fake score.
        self.method = run_method(rc["phases"])
        self.disc = discriminator_kind(rc["discriminator"])
        self.discriminator = self.disc == "sida"  # SiDA's logits in fake_step / generator_step
        if (self.disc != "none" or self.method == "add") and dataset is None:
            raise ConfigError(f"a run with discriminator {self.disc} or ADD phases needs real images: configure `data`")
        self.gen_sigmas = generation_sigmas(rc)
        rc["sigma_init"] = self.gen_sigmas[0]
        self.batch = rc["batch"]
        self.micro, self.rounds = accumulation(self.batch, rc["batch_per_proc"], info.world_size)
        self.gens = gens if gens is not None else make_generators(seed, info.rank, info.device, self.rounds)
        ref = nets.teacher
        self.img_shape = (ref.img_channels, ref.img_resolution, ref.img_resolution)
        self.label_dim = ref.label_dim
        self.augment = AugmentPipe(rc["augment"]) if rc["augment"] > 0 else None
        if self.augment is not None and getattr(nets.fake, "augment_dim", 0) < AUGMENT_DIM:
            raise ConfigError(f"distill.augment {rc['augment']} feeds {AUGMENT_DIM} augmentation labels to the fake "
                              f"score, but its network has augment_dim {getattr(nets.fake, 'augment_dim', 0)}: use a "
                              f"teacher built with network.kwargs.augment_dim: {AUGMENT_DIM}, or set distill.augment: 0")
        # The official SiDA loop clips the fake score's gradients in every phase of a run that
        # trains the discriminator (warm-up and SiD stretch included); the SiD loop never clips.
        self.fake_clip = rc["fake_clip"] if self.discriminator else None
        apply_precision(nets, rc["precision"])
        nets.teacher.eval().requires_grad_(False)
        nets.G_ema.eval().requires_grad_(False)
        if rc.get("channels_last"):
            # NHWC weights make every convolution (and, from the first one on, every activation)
            # channels-last: oneDNN's native layout, ~10% faster per iteration on the CPU at
            # 32x32 (bench.step). Inputs stay NCHW: the first conv switches the layout.
            for net in (nets.teacher, nets.G, nets.G_ema, nets.fake):
                net.to(memory_format=torch.channels_last)
        # EDM2 teachers (latent space): the fake score's uncertainty head weights the losses, and
        # forced weight normalisation runs after every optimiser step (and here, at the start of the
        # run: a resumed run then loads its saved weights over it, so resuming stays bit-exact).
        self.logvar = bool(rc.get("logvar"))
        self.force_wn = bool(rc.get("force_weight_norm"))
        if self.logvar and not getattr(nets.fake, "has_logvar", False):
            raise ConfigError("distill.logvar: true needs a teacher with an uncertainty head (EDM2Precond): "
                              "set it false for this teacher")
        if self.force_wn:
            self._post_step(nets.G)
            self._post_step(nets.fake)
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
        self._build_heads(seed)
        self.features_sha256: str | None = None  # ADD's DINOv2 weights (set by the stage), checked on resume
        self.g_params = list(nets.G.parameters())
        # The critic: the fake score (SiD family, DMD) with DMD2's head, or ADD's heads alone.
        self.f_params = [] if self.method == "add" else list(nets.fake.parameters())
        self.f_params += list(nets.head.parameters()) if nets.head is not None else []
        opt = dict(kind=rc["optimizer"], eps=rc["adam_eps"], weight_decay=rc["weight_decay"])
        self.opt_g = make_optimizer(self.g_params, lr=rc["lr_g"], betas=(rc["beta1_g"], rc["beta2"]), **opt)
        # (none for ADD without a discriminator: its distillation term alone trains the student)
        self.opt_f = (make_optimizer(self.f_params, lr=rc["lr_fake"], betas=(rc["beta1_fake"], rc["beta2"]), **opt)
                      if self.f_params else None)
        self.nimg = 0

    def _build_heads(self, seed: int) -> None:
        """DMD2's head on the fake score's bottleneck or ADD's heads on the frozen feature network,
        unless the run starts from a state that holds one (`init_nets`). Weights come from a
        private seed, so every process builds the same head and the global RNG does not move."""
        nets, rc = self.nets, self.rc
        if self.disc == "dmd2_head" and not isinstance(nets.head, DMD2Head):
            nets.head = dmd2_head_for(nets.fake, self.img_shape, self.label_dim, seed + 7, self.device)
        elif self.disc == "add":
            if nets.features is None:
                from ..nets.heads import TeacherFeatures
                from ..nets.vit import DINOv2Features, build_dinov2

                spec = rc["add_features"]
                nets.features = (TeacherFeatures(nets.teacher, spec["sigma"]) if spec["kind"] == "teacher_encoder" else
                                 DINOv2Features(build_dinov2(spec["arch"], spec["weights"]), spec["layers"]))
                nets.features.to(self.device)
            if not isinstance(nets.head, ADDHeads):
                nets.head = add_heads_for(nets.features, self.img_shape, self.label_dim, rc["add_cmap_dim"], seed + 7,
                                          self.device)
        elif self.disc not in ("dmd2_head", "add"):
            nets.head = None

    # -- schedule ---------------------------------------------------------------------------------
    def phase(self) -> Phase:
        for p in self.phases:
            if self.nimg < p.end_nimg:
                return p
        return self.phases[-1]

    def phase_name(self) -> str:
        return self.phase().kind

    def update(self, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], net: torch.nn.Module,
               value_clip: float | None = None) -> torch.Tensor:
        """One optimiser step on accumulated gradients: average over processes (non-finite entries
        counted and replaced), clip by value (`fake_clip`) then by norm (`grad_clip`), step, and
        the network's post-step (EDM2's forced weight norm). Returns the non-finite count."""
        bad = sync_gradients(params, self.info.group)
        if value_clip is not None:
            torch.nn.utils.clip_grad_value_(params, value_clip)
        if self.rc["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(params, self.rc["grad_clip"])
        opt.step()
        self._post_step(net)
        opt.zero_grad(set_to_none=True)  # freed at once: the next pass builds its graph without them
        return bad

    def generator_turn(self) -> bool:
        """Whether this iteration updates the generator (every `critic_ratio`-th; a function of
        the image count, so a resumed run keeps the turn)."""
        return generator_turn(self.nimg, self.batch, self.rc["critic_ratio"])

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

    def _set_lrs(self) -> None:
        """`lr_warmup_kimg`: both learning rates ramp linearly with the run's images."""
        w = self.rc["lr_warmup_kimg"]
        if w > 0:
            set_lr(self.opt_g, warmup_lr(self.rc["lr_g"], self.nimg, w))
            if self.opt_f is not None:
                set_lr(self.opt_f, warmup_lr(self.rc["lr_fake"], self.nimg, w))

    def _post_step(self, net: torch.nn.Module) -> None:
        """After an optimiser step: forced weight normalisation of EDM2 layers (a no-op elsewhere)."""
        if self.force_wn:
            force_weight_norm_(net)

    # -- random draws (all from this rank's generators) --------------------------------------------
    def _labels(self, n: int, r: int) -> torch.Tensor:
        """Class labels of `n` dataset samples, as the official loops take them from data batches
        (so unequal class sizes, e.g. ImageNet's, are respected). Without a dataset (analytic
        tests, benchmarks) labels are uniform over the classes."""
        if self.label_dim == 0:
            return torch.zeros([n, 0], device=self.device)
        if self.dataset is not None:
            return self.dataset.labels(self._indices(n, r)).to(self.device, non_blocking=True)
        idx = torch.randint(self.label_dim, (n,), generator=slot_generator(self.gens, "data", r))
        return F.one_hot(idx, self.label_dim).float().to(self.device)

    def _indices(self, n: int, r: int) -> torch.Tensor:
        """`n` dataset indices drawn with replacement from this slot's data stream."""
        return torch.randint(len(self.dataset), (n,), generator=slot_generator(self.gens, "data", r))

    def _real(self, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real images with their labels; the generator is then conditioned on the same labels."""
        # Latent datasets draw each latent as mean + N(0,1) std: from the same slot stream.
        x, labels = self.dataset.get_batch(self._indices(n, r), generator=slot_generator(self.gens, "data", r))
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

    def _autocast(self):
        """torch.autocast for `precision: bf16`; fp16 needs none (the networks run EDM's fp16 path
        themselves, see apply_precision) and fp32 none either."""
        return autocast(self.device, "bf16" if self.rc["precision"] == "bf16" else "fp32")

    def _augment(self, images: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fake score's input augmentation, drawn from this slot's noise stream."""
        if self.augment is None:
            return images, None
        return self.augment(images, slot_generator(self.gens, "noise", r))

    # -- the two updates --------------------------------------------------------------------------
    def fake_step(self, kind: str) -> dict[str, torch.Tensor]:
        """Fake-score (+discriminator) update on x_g.detach() (docs/design.md step 1)."""
        nets, rc = self.nets, self.rc
        nets.fake.train().requires_grad_(True)
        nets.G.eval()
        self.opt_f.zero_grad(set_to_none=True)
        total = self.micro * self.rounds
        zero = torch.zeros((), device=self.device)
        stats = {"loss_fake": zero.clone(), "dropped_fake": zero.clone()}
        if self.discriminator:
            stats.update({k: zero.clone() for k in ("loss_d", "d_acc_real", "d_acc_fake")})
        for r in range(self.rounds):
            if self.discriminator:
                real, labels = self._real(self.micro, r)
            else:
                real, labels = None, self._labels(self.micro, r)
            with torch.no_grad(), self._autocast():
                x_g = self._generate(labels, r)
            # Generated and real images are augmented independently (the official loss calls
            # the pipe on each); both then get the same sigma and noise.
            x_g, aug_fake = self._augment(x_g.float(), r)
            aug_real = None
            if real is not None:
                real, aug_real = self._augment(real, r)
            sigma = (self._randn([self.micro, 1, 1, 1], r) * rc["P_std"] + rc["P_mean"]).exp()
            n = self._randn(x_g.shape, r) * sigma
            with self._autocast():
                # augment_labels only when augmenting: benchmark stand-ins for fake_forward take
                # its six positional arguments.
                denoised, lf, lr = fake_forward(nets.fake, x_g + n, None if real is None else real + n,
                                                sigma.flatten(), labels, self.discriminator,
                                                **({} if aug_fake is None else {"augment_labels": (aug_fake, aug_real)}))
            logvar = nets.fake.logvar(sigma) if self.logvar else None  # EDM2: u(sigma), a function of sigma only
            l_fake, l_d, keep = fake_score_losses(denoised.float(), x_g, sigma, lf, lr, self.sigma_data, logvar)
            if self.discriminator:
                stats["loss_d"] += (l_d.sum() / total).detach()
                # Separately: a discriminator that calls everything real (or fake) scores 0.5 on average.
                stats["d_acc_real"] += (lr.detach() > 0).float().mean() / self.rounds
                stats["d_acc_fake"] += (lf.detach() < 0).float().mean() / self.rounds
            loss = fake_score_objective(l_fake, l_d, total, rc["lambda_d"])
            loss.backward()
            stats["loss_fake"] += (l_fake.sum() / total).detach()
            stats["dropped_fake"] += (~keep).sum()
        # update() frees the gradients, so the generator step builds its graph without them.
        stats["nonfinite_fake"] = self.update(self.opt_f, self.f_params, nets.fake, self.fake_clip)
        nets.fake.eval().requires_grad_(False)
        return stats

    def generator_step(self, kind: str) -> dict[str, torch.Tensor]:
        """Generator update through the frozen teacher and fake score (docs/design.md step 2)."""
        nets, rc = self.nets, self.rc
        adversarial = kind == "sida"
        nets.G.train().requires_grad_(True)
        nets.fake.eval().requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        total = self.micro * self.rounds
        zero = torch.zeros((), device=self.device)
        stats = {"loss_g_sid": zero.clone(), "dropped_g": zero.clone()}
        if adversarial:
            stats["loss_g_adv"] = zero.clone()
        for r in range(self.rounds):
            labels = self._labels(self.micro, r)
            with self._autocast():
                x_g = self._generate(labels, r).float()
                t = self._rand([self.micro, 1, 1, 1], r)
                sigma_t = sid_sigma_t(t * rc["tmax"] / 1000)
                x_t = x_g + sigma_t * self._randn(x_g.shape, r)
                y_real = nets.teacher(x_t, sigma_t.flatten(), labels)
                if adversarial:
                    y_fake, logits = nets.fake(x_t, sigma_t.flatten(), labels, return_flag="encoder_decoder")
                else:
                    y_fake, logits = nets.fake(x_t, sigma_t.flatten(), labels), None
            logvar = None
            if self.logvar:
                with torch.no_grad():  # the fake score is frozen here: a constant weight
                    logvar = nets.fake.logvar(sigma_t)
            l_sid, l_adv, keep = generator_losses(y_real.float(), y_fake.float(), x_g, rc["alpha"], logits, logvar)
            if adversarial:
                stats["loss_g_adv"] += (l_adv.sum() / total).detach()
            loss = generator_objective(l_sid, l_adv, rc["lambda_sid"], rc["lambda_adv"], total, adversarial)
            loss.backward()
            stats["loss_g_sid"] += (l_sid.sum() / total).detach()
            stats["dropped_g"] += (~keep).sum()
        stats["nonfinite_g"] = self.update(self.opt_g, self.g_params, nets.G)
        nets.G.eval().requires_grad_(False)
        return stats

    def step(self) -> dict[str, torch.Tensor]:
        kind = self.phase().kind
        self._set_lrs()
        if self.method == "dmd":
            return dmd_iteration(self, kind)
        if self.method == "add":
            return add_iteration(self, kind)
        stats = self.fake_step(kind)
        if kind != "warmup" and self.generator_turn():
            stats.update(self.generator_step(kind))
            self.update_ema()
        return stats

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        n = self.nets
        state = {"G": n.G.state_dict(), "G_ema": n.G_ema.state_dict(), "fake": n.fake.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "nimg": self.nimg}
        if self.opt_f is not None:
            state["opt_f"] = self.opt_f.state_dict()
        if n.head is not None:
            state["head"] = n.head.state_dict()
        if self.features_sha256 is not None:
            state["features_sha256"] = self.features_sha256
        return state

    def load_state_dict(self, state: dict) -> None:
        n = self.nets
        if state.get("features_sha256") != self.features_sha256:
            raise CheckpointError(f"the checkpoint was written with ADD features of sha256 {state.get('features_sha256')}, "
                                  f"this run's are {self.features_sha256}: restore those weights, or delete the "
                                  f"stage's work dir to start over")
        n.G.load_state_dict(state["G"])
        n.G_ema.load_state_dict(state["G_ema"])
        n.fake.load_state_dict(state["fake"])
        if n.head is not None:
            n.head.load_state_dict(state["head"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_f is not None:
            self.opt_f.load_state_dict(state["opt_f"])
        self.nimg = int(state["nimg"])


def init_nets(teacher: torch.nn.Module, dropout: float | None, init_state: dict | None = None,
              init_generator: torch.nn.Module | None = None) -> Nets:
    """The run's networks: G and f_psi from the teacher, or from a previous run's final state;
    G (and its EMA) from another run's EMA generator for SiD2A. G, G_ema and f_psi get the run's
    `dropout` (None: keep the rate they were built with), as the official code builds all of
    them with --dropout; the teacher keeps its own (it never trains)."""
    from ..io.checkpoints import network_from_record
    from ..io.factory import clone_with_dropout

    device = next(teacher.parameters()).device
    if init_state is not None:
        G, G_ema, fake = (network_from_record(init_state[k], "init state").to(device) for k in ("G", "G_ema", "fake"))
    else:
        G, G_ema, fake = teacher, teacher, teacher
    if init_generator is not None:
        G = G_ema = init_generator.to(device)
    G, G_ema, fake = (clone_with_dropout(net, dropout) for net in (G, G_ema, fake))
    # A run that starts from a DMD2 / ADD run's state keeps its discriminator head (the loop
    # builds a fresh one when the state has none or one of another kind).
    head = head_from_record(init_state["head"]).to(device) if init_state and "head" in init_state else None
    return Nets(teacher=teacher, G=G.requires_grad_(True), G_ema=G_ema, fake=fake, head=head)
