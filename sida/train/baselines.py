"""DMD2 and ADD as baselines in the distillation loop: the network-call pieces of one update, and
the design the loop integration follows.

Every function here takes its random draws as arguments (the loop draws them from its slot
generators, see below) and returns per-pixel or per-sample terms for the objective helpers of
`sida.train.losses` (`dmd2_generator_objective`, `dmd2_critic_objective`,
`add_generator_objective`, `add_discriminator_objective`), so one micro-batch is a pure function
of (networks, draws) and gradient accumulation / several processes give one-big-batch results.

Design of the loop integration (issue 14; as built in `sida.train.distill` and
`sida.train.baseline_steps`, with the differences noted at the end of this note)
================================================================================

Phase kinds (a run's `phases: [{kind, kimg}]`, as today)
  - `warmup`, `sid`, `sida`: unchanged.
  - `dmd2`: one iteration = [generator update, when iteration % critic_ratio == 0] then a critic
    update, both on the same x_g = G(80 z, 80) drawn at the start of the iteration (DMD2's
    train_one_step order: the generator goes first, the critic then trains on the detached x_g
    from *before* the generator's step; keep x_g.detach() per slot, do not regenerate).
      generator: dmd2_generator_objective(dmd_term(...), ns_generator_loss(dmd2_head_logits(
                 fake, head, x_g, ...)), batch_total, lambda_gan=3e-3); gradients reach G through
                 the frozen fake score's encoder and the head (their parameters frozen for this
                 step; DMD2 zeroes the critic's stray gradients afterwards).
      critic:    dmd2_critic_objective(fake_score_term(...) at sigma on the whole grid (0..999,
                 not EDM's log-normal), ns_discriminator_loss(head logits of noisy reals, of noisy
                 x_g.detach()), batch_total, lambda_cls=1e-2); fake score and head in one optimiser.
    Iteration index = nimg // batch within the run (batch is fixed per run), so the turn needs no
    extra state. Every iteration counts `batch` images (the critic sees `batch` fresh fakes).
  - `dmd`: `dmd2` without the GAN terms (no head, no real data: data-free like SiD).
  - `add`: one iteration = discriminator-heads update then student update, on one batch:
      real x0 with labels (the student is conditioned on them), student level s ~ U{0..3},
      x_s = x0 + sigma_s eps_s, x_hat = G(x_s, sigma_s).
      heads:   add_discriminator_objective(hinge_discriminator_loss(add_logits(real), add_logits(
               x_hat.detach())), r1 of `add_real_logits_with_r1`, batch_total, gamma=1e-5).
      student: add_generator_objective(hinge_generator_loss(add_logits(features, heads, x_hat)),
               add_distill_term(teacher, x_hat, sigma_t, eps_t, ...), batch_total, lambda=2.5).
    ADD has no fake score: its run trains G and the heads only.

Discriminator kinds (run setting `discriminator`; booleans stay accepted: true = sida, false = none)
  none (sid, dmd, warmup) | sida (sida phases; today's channel-mean logits) | dmd2_head (dmd2
  phases; `sida.nets.heads.DMD2Head` on the fake score's bottleneck, built with
  heads.seeded(..., seed)) | add (add phases; `ADDHeads` on a frozen feature network:
  `TeacherFeatures` by default, DINOv2 ViT-S/14 from a local weights file for paper presets).
  A phase kind that needs another discriminator than the run declares is a config error.

Per-run settings (defaults = today's SiD behaviour)
  critic_ratio: 1 (DMD2: 5 critic updates per generator update).
  optimizer: {kind: adam | adamw, betas: [0.0, 0.999], eps: 1e-8, weight_decay: 0} for G and
      for the critic (DMD2: adamw, [0.9, 0.999], 1e-8, 0.01 for both) -> `make_optimizer`.
  warmup_kimg: 0: lr * min(1, nimg / warmup_nimg) for both optimisers, the teacher loop's
      formula (DMD2 publishes --warmup_step 500, but accelerate steps a prepared scheduler once
      per process per iteration, train_edm.py l.110 says so: on 7 GPUs the ramp lasts 500 / 7
      iterations = 500 x 40 per-GPU images = 20 kimg, whatever the GPU count).
  grad_clip_norm: null | float, applied after `sync_gradients`, per optimiser over all its
      parameters (DMD2: 10 for G, 10 for fake score + head together).
  ema: true | false (DMD2: false: the raw generator is the network that is saved and evaluated).
  gen_sigma(s): recorded in the network file with the generator and read by generate/evaluate:
      2.5 (SiD family), 80 (DMD2: --conditioning_sigma), ADD's student levels
      `sampler.add_student_sigmas()` = [80, 17.50, 2.504, 0.1681]; k-step ADD sampling uses
      `few_step_generate(G, z, sigmas[::4 // k])` for k in {1, 2, 4}.
  DMD2: lambda_gan 3e-3, lambda_cls 1e-2, dm_index_range [20, 980], gan_index_range [0, 999].
  ADD: lambda_distill 2.5, r1_gamma 1e-5, distill_weighting exponential | sds,
      student_steps [999, 749, 499, 249], distill_index_range [0, 999] (ours: the paper samples
      the teacher's time steps without saying which), feature_net {kind: teacher_encoder,
      sigma: 0.5 (ours), levels: all} | {kind: dinov2, weights: PATH}, cmap_dim 64.

Feature networks of ADD (never the evaluation's classifier: it would leak the metric)
  The heads take any callable features(x, labels) -> list of [B, C, H, W] maps or [B, N, C]
  tokens; `heads.probe_features` sizes them. teacher_encoder = `heads.TeacherFeatures(teacher,
  sigma)` (every encoder level). dinov2: nothing below sida/eval may import sida/eval, so the
  ViT builder belongs in sida/nets (sida/eval/features.py importing it from there), or the stage
  builds it and hands it to the loop. A wrapper: x in [-1, 1] -> (x + 1) / 2 -> bicubic resize
  to 224 -> ImageNet mean/std -> timm's vit_small_patch14_dinov2 (frozen, eval, weights from the
  local file) .forward_intermediates(x, indices=[2, 5, 8, 11], output_fmt='NLC',
  intermediates_only=True) = four [B, 256, 384] patch-token maps (class token dropped); heads
  ADDHeads([384] * 4, [256] * 4, label_dim). Checked by hand with random weights (timm 1.0.31).

Checkpoint state (the loop's state_dict; `Checkpointer` adds RNG states and the config hash)
  G, G_ema (when ema), fake (dmd2, dmd), head (dmd2_head) or ADD heads (add), opt_g, opt_f (the
  critic's: fake + head, or ADD's heads), nimg. Not stored: the teacher and the frozen feature
  network (rebuilt from the teacher / weights file; record the weights' sha256 in the state
  and refuse to resume on a mismatch), learning rates (functions of nimg), the generator turn
  (a function of nimg). The network file of a finished run adds gen_sigma(s) and the head's
  constructor kwargs.

Random draws (every one from `loop.slot_generator(gens, kind, r)` of micro-batch slot r, in
this order each iteration; skipped draws are skipped identically on every rank, since the turn
is a function of nimg):
  dmd2 / dmd:  data/r: generator labels [micro] (randint label_dim); dmd2: real indices [micro].
               noise/r: z [micro, C, H, W];
                 generator turn: DM grid index [micro,1,1,1] in 20..980, eps_dm; dmd2: GAN grid
                 index in 0..999, eps_gan;
                 critic: fake-loss grid index in 0..999, eps_fake; dmd2: real grid index, eps_real,
                 fake grid index, eps_x_g.
  add:         data/r: real indices [micro] (labels from the dataset).
               noise/r: student level [micro] (randint 4), eps_s; distillation grid index, eps_t.
  Heads are built under `heads.seeded(build, seed)`; GroupNorm without batch statistics, no
  spectral norm (its power iteration would run once per micro-batch), per-sample R1; so
  2 processes == 1 process with 2 accumulation rounds, and a resumed run replays bit-exactly.

As built (where it differs from the plan above)
  - Settings are the schema's `distill` keys (every one per run): `optimizer`, `beta1_g`,
    `beta1_fake`, `beta2`, `weight_decay`, `lr_warmup_kimg`, `grad_clip`, `ema`, `critic_ratio`,
    `lambda_gan`, `lambda_cls`, `dm_index_range`, `lambda_distill`, `r1_gamma`, `add_weighting`,
    `add_student_steps`, `add_distill_index_range`, `add_features` {kind, sigma, arch, weights,
    layers}, `add_cmap_dim`; the generation sigmas are `sida.run.config.generation_sigmas`
    (`gen_sigmas` in the network file's metadata; ADD ignores `sigma_init`).
  - `warmup` phases train the run's critic alone (DMD: fake score + head; ADD: the heads).
  - DMD2 runs draw real images with their labels per slot and condition the generator on those
    labels (as SiDA does); `dmd` runs draw labels only (data-free).
  - ADD: the student update goes first, then the heads train on the real images and the
    student's detached outputs of the same batch (one student forward per iteration, the order
    DMD2 uses too). An `add` run with `discriminator: none` trains the distillation term alone
    (the ablation the analytic tests use). The feature network is built by the loop; DINOv2's
    weights file is resolved by the stage (fetch/dinov2_<arch>.pth) and its sha256 is kept in
    the resume state (a resume with other weights is refused).
  - k-step sampling visits the levels round(i N / k), i < k (`sampler.sampling_sigmas`); its
    re-noising is drawn per sample from a generator seeded by that sample's latent
    (`sida.eval.sampling.latent_noise`), so it does not depend on the batch.

DMD2's published ImageNet-64 settings (tianweiy/DMD2, the stored snapshot read for this note)
  experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh:
    l.5 torchrun --nproc_per_node 7; l.6-7 generator_lr 2e-6, guidance_lr 2e-6; l.10 batch_size 40
    per process (global 280); l.11 initialie_generator (G and fake score from the teacher);
    l.15 seed 10; l.16 teacher edm-imagenet-64x64-cond-adm.pkl; l.20 use_fp16 (bfloat16 per
    experiments/imagenet/README.md l.3); l.23 dfake_gen_update_ratio 5; l.24 cls_loss_weight 1e-2;
    l.25 gan_classifier; l.26 gen_cls_loss_weight 3e-3; l.27-28 diffusion_gan,
    diffusion_gan_max_timestep 1000.
  main/edm/train_edm.py: l.97-108 AdamW betas (0.9, 0.999), weight_decay 0.01 (eps default 1e-8)
    for generator and guidance; l.111-123 constant_with_warmup; l.235 generator turn on
    step % ratio == 0; l.239-263 generator step, l.267-289 critic step; l.257, 285 clip_grad_norm
    max_grad_norm; defaults l.469 warmup_step 500, l.470-471 min/max_step_percent 0.02 / 0.98,
    l.473 num_train_timesteps 1000, l.474 sigma_max 80, l.475 conditioning_sigma 80, l.477
    sigma_min 0.002, l.478 sigma_data 0.5, l.479 rho 7, l.485 max_grad_norm 10. No EMA.
  main/edm/edm_network.py l.3-13: ADM 192, [1, 2, 3, 4], 3 blocks, attention [32, 16, 8], dropout 0.
  main/edm/edm_guidance.py: l.48-56 head (768 wide, 32 groups); l.61-66 grid (flipped Karras);
    l.82-88 randint(20, 981); l.102-111 gradient and loss; l.138-160 fake loss on the whole grid,
    weight 1/sigma^2 + 1/sd^2; l.176-189 GAN inputs noised on grid indices 0..999, bottleneck of
    the fake score; l.199 softplus(-logits); l.209 softplus(fake) + softplus(-real).
  experiments/imagenet/README.md l.9: FID 1.51 after ~200k iterations (checkpoint 193,500; 53 h);
    l.10: the same without GAN (imagenet_lr2e-6_scratch.sh), FID 2.61 after 410k (checkpoint
    405,500); l.11 and l.13: FID 1.28 = the no-GAN run's best checkpoint resumed with the GAN at
    lr 5e-7 for 140k iterations (..._lr5e-7_resume.sh: same flags, l.6-7 lr 5e-7, l.31
    ckpt_only_path .../imagenet_lr2e-6_scratch_fid2.61_checkpoint_model_405500). config/
    dmd2-imagenet64.yaml runs all three.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from .losses import add_distill_loss, add_distill_weight, dmd_generator_loss, edm_denoising_loss, r1_penalty

__all__ = ["make_optimizer", "warmup_lr", "generator_turn", "dmd_term", "fake_score_term", "dmd2_head_logits",
           "add_student_sigma", "add_distill_term", "add_logits", "add_real_logits_with_r1"]

OPTIMIZERS = ("adam", "adamw")
Net = Callable[..., torch.Tensor]


def make_optimizer(params: Iterable[torch.nn.Parameter], kind: str, lr: float,
                   betas: Sequence[float] = (0.0, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (SiD: betas (0, 0.999), no weight decay) or AdamW (DMD2: (0.9, 0.999), 0.01)."""
    kw = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
              weight_decay=float(weight_decay))
    if kind == "adam":
        return torch.optim.Adam(params, **kw)
    if kind == "adamw":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"optimizer kind must be one of {OPTIMIZERS}, got {kind!r}")


def warmup_lr(lr: float, nimg: int, warmup_kimg: float) -> float:
    """Linear warm-up by images seen: lr * min(1, nimg / warmup_nimg) (0 before the first image,
    as DMD2's constant_with_warmup and the teacher loop's ramp)."""
    ramp = warmup_kimg * 1000
    return lr * (min(nimg / ramp, 1.0) if ramp > 0 else 1.0)


def generator_turn(nimg: int, batch: int, critic_ratio: int) -> bool:
    """Whether the iteration starting at `nimg` images updates the generator (DMD2: every
    critic_ratio-th iteration, the first one included)."""
    return (nimg // batch) % critic_ratio == 0


def _flat(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1)


def dmd_term(teacher: Net, fake: Net, x_g: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
             labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-pixel DMD loss at x_t = x_g + sigma eps: both denoisers run without gradient (DMD2
    evaluates them under no_grad), so the generator's gradient is exactly g on x_g."""
    with torch.no_grad():
        x_t = x_g.detach() + sigma * eps
        y_real = teacher(x_t, _flat(sigma), labels)
        y_fake = fake(x_t, _flat(sigma), labels)
    return dmd_generator_loss(y_real, y_fake, x_g)


def fake_score_term(fake: Net, x_g: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                    labels: Optional[torch.Tensor], sigma_data: float = 0.5) -> torch.Tensor:
    """Per-pixel EDM denoising loss of the fake score on the detached x_g noised at sigma
    (DMD2's compute_loss_fake: weight 1/sigma^2 + 1/sd^2 = EDM's lambda(sigma))."""
    x = x_g.detach()
    denoised = fake(x + sigma * eps, _flat(sigma), labels)
    return edm_denoising_loss(denoised.float(), x.float(), sigma, sigma_data)


def dmd2_head_logits(fake: Net, head: Net, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                     labels: Optional[torch.Tensor]) -> torch.Tensor:
    """DMD2's classifier logits [B, 1]: the head on the fake score's bottleneck at x + sigma eps
    (freshly noised at each call; DMD2's compute_cls_logits with diffusion_gan)."""
    rep = fake(x + sigma * eps, _flat(sigma), labels, return_flag="encoder_features")[-1]
    return head(rep)


def add_student_sigma(level: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """The student noise level of each sample from its drawn level index (0..N-1) -> [B,1,1,1]."""
    table = torch.tensor([float(s) for s in sigmas], dtype=torch.float32, device=level.device)
    return table[level.reshape(-1)].reshape(-1, 1, 1, 1)


def add_distill_term(teacher: Net, x_hat: torch.Tensor, sigma_t: torch.Tensor, eps: torch.Tensor,
                     labels: Optional[torch.Tensor], weighting: str = "exponential") -> torch.Tensor:
    """Per-pixel ADD distillation loss: the teacher denoises sg(x_hat) + sigma_t eps without
    gradient, the student output is pulled towards it with weight c(sigma_t) (ADD eq. 5)."""
    with torch.no_grad():
        target = teacher(x_hat.detach() + sigma_t * eps, _flat(sigma_t), labels)
    return add_distill_loss(x_hat, target, add_distill_weight(sigma_t, weighting))


def add_logits(features: Net, heads: Net, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """ADD's discriminator logits [B, sum_k N_k] of images x: frozen features, trainable heads.
    Gradients reach x (the student's adversarial loss) and the heads' parameters."""
    return heads(features(x, labels), labels)


def add_real_logits_with_r1(features: Net, heads: Net, x0: torch.Tensor,
                            labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, sum N_k], R1 [B]) of real images, R1 taken on the heads' inputs (the frozen
    features of x0, ADD Section 3.2), not on the pixels and not on the heads' parameters."""
    with torch.no_grad():
        feats = [f.detach() for f in features(x0, labels)]
    feats = [f.requires_grad_(True) for f in feats]
    logits = heads(feats, labels)
    return logits, r1_penalty(logits, feats)
