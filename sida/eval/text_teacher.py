"""Sampling and scoring the text-to-image testbed's teacher (a pipeline folder from
`teacher.source: train_text`): diffusers' DDIM loop with classifier-free guidance, then FD in
the digits classifier's features against the digits and the prompt-alignment score
(`sida.eval.alignment`) at each guidance scale.

    python -m sida.eval.text_teacher --config config/digits-text.yaml \
        [--pipeline results/digits-text/teacher/pipeline] [--scales 1 1.5 2 3 4.5] [--num 2000] [--steps 25] \
        [--set results_dir=...]

prints one JSON line per scale: {"scale", "fd", "alignment", "num", "steps"}.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator, Sequence

import torch

from ..io.text_encoder import TextEncoder
from ..io.digits_text import caption, prompt_set
from ..io.images import quantize
from ..io.text_pipeline import load_text_pipeline
from .alignment import prompt_alignment
from .digits_classifier import digits_uint8
from .features import DigitsClassifierExtractor, cache_dir, load_or_train_digits_classifier
from .metrics import fd_from_features


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, scheduler: Any, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                steps: int, generator: torch.Generator, batch: int = 500) -> torch.Tensor:
    """Images in [-1, 1] for conditions `cond` [n, L, D]: DDIM (eta 0) in `steps` steps from the
    training scheduler's config, eps = eps_u + scale (eps_c - eps_u) with `uncond` [1, L, D] the
    empty prompt's embedding (scale 1: the conditional model alone, one evaluation per step)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn((cond.shape[0], *shape), generator=generator)  # drawn up front: batch-independent
    out = []
    for lo in range(0, cond.shape[0], batch):
        c = cond[lo:lo + batch]
        x = noise[lo:lo + batch].to(c.device)
        both = torch.cat([uncond.expand_as(c), c]) if scale != 1 else c
        for t in ddim.timesteps:
            if scale == 1:
                eps = unet(x, t, encoder_hidden_states=c).sample
            else:
                e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
                eps = e_u + scale * (e_c - e_u)
            x = ddim.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def sample_text_grid(unet: torch.nn.Module, scheduler: Any, tokenizer, text_encoder: torch.nn.Module,
                     templates: Sequence[str], cols: int, scale: float, steps: int, seed: int) -> torch.Tensor:
    """A sample grid's images: row d shows digit d under the first template, `cols` samples a row."""
    prompts = [caption(templates[0], d) for d in range(10) for _ in range(cols)]
    encoder = TextEncoder(tokenizer, text_encoder)
    cond, uncond = encoder.encode(prompts), encoder.encode([""])
    return ddim_sample(unet, scheduler, cond, uncond, scale, steps, torch.Generator().manual_seed(seed))


def score_samples(extractor: DigitsClassifierExtractor, images: torch.Tensor, digits: Sequence[int],
                  real_features: torch.Tensor) -> dict[str, float]:
    """FD against `real_features` and prompt alignment of images in [-1, 1]."""
    feats, probs = extractor(quantize(images))
    return {"fd": fd_from_features(feats, real_features), "alignment": prompt_alignment(probs, digits)}


def evaluate_text_teacher(cfg: dict, pipeline: str, scales: Sequence[float], num: int, steps: int,
                          seed: int = 0) -> Iterator[dict]:
    """One row per guidance scale, as each is done: FD (digits classifier, `num` samples vs the 1,797 digits) and
    prompt alignment, for a balanced prompt set (`sida.io.digits_text.prompt_set`); the same
    noise at every scale."""
    parts = load_text_pipeline(pipeline)
    extractor = load_or_train_digits_classifier(cache_dir(cfg), seed=0)
    real, _ = extractor(torch.from_numpy(digits_uint8()[0]))
    prompts, digits = prompt_set(num, cfg["teacher"]["text"]["templates"])
    encoder = TextEncoder(parts["tokenizer"], parts["text_encoder"])
    cond, uncond = encoder.encode(prompts), encoder.encode([""])
    for scale in scales:
        t0 = time.perf_counter()
        images = ddim_sample(parts["unet"], parts["scheduler"], cond, uncond, scale, steps,
                             torch.Generator().manual_seed(seed))
        yield {"scale": scale, **score_samples(extractor, images, digits, real), "num": num, "steps": steps,
               "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> None:
    from ..run.cli import stage_parser
    from ..run.config import load_config

    parser = stage_parser("python -m sida.eval.text_teacher", __doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="pipeline folder (default: <results_dir>/<experiment>/teacher/pipeline)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.5])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    pipeline = args.pipeline or f"{cfg['results_dir']}/{cfg['experiment']}/teacher/pipeline"
    torch.set_num_threads(max(cfg["threads"], 1))
    for row in evaluate_text_teacher(cfg, pipeline, args.scales, args.num, args.steps, args.seed):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    from ..run.cli import run_stage

    run_stage(main)
