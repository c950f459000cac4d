"""Evaluation of one network (the job behind `stages.evaluate`): `num_runs` runs of
`num_samples` samples, each scored against the reference statistics.

- `prepare_evaluand`: the network, its sampler, the feature network and its reference (a text
  network with `evaluate.coco`: the zero-shot COCO protocol of `sida.eval.zero_shot_eval`).
- `score_run`: FD/FID, IS and precision/recall of one run's features.
- `evaluate_network`: every run (kept on disk as it finishes, see `RunStore`), the summaries with
  their standard errors, the value at the training monitor's sample count, the sample grid, and
  everything metrics.json records about how they were made.

The pieces live by job: the noise and labels of each seed in `sida.eval.noise`, the sharded
feature extraction in `sida.eval.extract`, reference statistics in `sida.eval.refstats`, the
samplers in `sida.eval.sampling`, the training monitor in `sida.eval.monitor`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..nets.sampler import sampling_sigmas
from ..run import dist
from .extract import extract_generated_multi
from .features import Extractor, build_extractor
from ..io.assets import sha256_file
from .metrics import feature_stats, frechet_distance, inception_score, precision_recall
from .noise import class_counts, seed_note, seed_ranges
from .refstats import Reference, get_reference
from ..io.text_run import is_text_network, vae_of
from .alignment import prompt_alignment
from .noise import latents_for_seeds
from .prompting import ClassPrompts, check_text_network, class_prompts, text_generate, text_sampler
from .sampling import GenerateFn, check_network, decode_fn, generator_sigmas, make_generate, sample_grid
from .stats import summarize
from .zero_shot_eval import ZeroShot, prepare_zero_shot, zero_shot_run

__all__ = ["score_run", "extractor_config", "Evaluand", "prepare_evaluand", "evaluate_network"]


def score_run(ref: Reference, feats: np.ndarray, probs: np.ndarray | None, cfg: dict, key: str,
              device: torch.device | str = "cpu") -> dict:
    """FD/FID against the reference, IS (when probs), precision/recall (when real features)."""
    ev = cfg["evaluate"]
    mu, sigma = feature_stats(feats)
    out = {key: frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ev["inception_score"] and probs is not None:
        out["is"], out["is_std"] = inception_score(probs, ev["is_splits"])
    if ev["precision_recall"] and ref.features is not None:
        n = ev["pr_max_samples"]
        out["precision"], out["recall"] = precision_recall(ref.features[:n], feats[:n], ev["pr_k"], device=device)
    return out


def _monitor_protocol(cfg: dict, feats: np.ndarray, ref: Reference, key: str, first_seed: int) -> dict | None:
    """FD/FID of the first `during_training.num_samples` evaluation samples: the training
    monitor's sample count and labels (so its bias), from the evaluation's own seeds, so it costs
    no extra sampling (35-NFE teachers are what evaluation time is spent on). None when the
    monitor is off or the evaluation has fewer samples."""
    s = cfg["evaluate"]["during_training"]
    n = int(s["num_samples"])
    if float(s["every_kimg"]) <= 0 or len(feats) < n:
        return None
    return {key: frechet_distance(*feature_stats(feats[:n]), ref.mu, ref.sigma), "num_samples": n,
            "seeds": [first_seed, first_seed + n - 1]}


def extractor_config(cfg: dict, name: str) -> dict:
    """`cfg` with `evaluate.extractor` set to `name` (what an extra feature network's reference
    statistics and weights are resolved with)."""
    return {**cfg, "evaluate": {**cfg["evaluate"], "extractor": name}}


def _extra_metrics(cfg: dict, info: dist.DistInfo, res: int, ch: int, what: str) -> list[tuple[Extractor, Reference]]:
    """(extractor, reference) of every `evaluate.extra_extractors` entry, checked like the main one."""
    out = []
    for name in cfg["evaluate"].get("extra_extractors") or []:
        xcfg = extractor_config(cfg, name)
        x = build_extractor(xcfg, info.device)
        x.check_images(res, ch, f"network {what}")
        out.append((x, get_reference(xcfg, x, info, res)))
    return out


@dataclass
class Evaluand:
    """A network ready to be scored: `generate(z, labels)` (decoded to images for latent
    networks), its NFE, the noise shape (C, H, W) and label_dim, the extractor and its reference."""

    net: torch.nn.Module
    generate: GenerateFn
    nfe: int
    shape: tuple[int, int, int]
    label_dim: int
    extractor: Extractor
    ref: Reference
    decode: Callable | None
    prompts: ClassPrompts | None = None  # a text network's prompt per class (zero-shot: per grid row)
    zero_shot: ZeroShot | None = None  # scored on COCO captions (`sida.eval.zero_shot_eval`)


def prepare_evaluand(cfg: dict, network: str | Path, kind: str, info: dist.DistInfo, steps: int = 1,
                     need_features: bool = False) -> Evaluand:
    """Load `network` (checked against the config's data), the config's extractor (checked against
    the images) and reference statistics, and the sampler of `kind` ('generator' in `steps`
    steps, or the Heun 'teacher'): what `evaluate_network` and `bench.eval_spread` score with."""
    from ..io.checkpoints import load_network

    net = load_network(network, info.device)
    extractor = build_extractor(cfg, info.device)
    zero_shot = prepare_zero_shot(cfg, net, str(network), extractor, info)
    if not is_text_network(net):
        res, ch, label_dim = check_network(net, cfg, str(network))
        extractor.check_images(res, ch, f"network {network}")
        ref = get_reference(cfg, extractor, info, res, need_features=need_features)
        decode = decode_fn(cfg, info.device)
        generate, nfe = make_generate(net, kind, cfg, decode, steps)
        return Evaluand(net, generate, nfe, (ch, res, res), label_dim, extractor, ref, decode)
    # A text network: its images decoded by its pipeline's VAE, the teacher under guidance; scored
    # on COCO captions (zero-shot) or, on class-labelled data, with a prompt per class.
    vae = vae_of(net, info.device)
    decode = None if vae is None else vae.decode
    shape = (net.img_channels, net.img_resolution, net.img_resolution)  # the noise is the network's (latents)
    if zero_shot is not None:
        zs, ref = zero_shot
        net, generate, nfe = text_sampler(net, kind, cfg, decode, steps)
        return Evaluand(net, generate, nfe, shape, 0, extractor, ref, decode,
                        zs.grid_prompts(cfg["evaluate"]["grid_size"]), zs)
    res, ch, label_dim = check_text_network(net, cfg, str(network), decode)
    extractor.check_images(res, ch, f"network {network}")
    ref = get_reference(cfg, extractor, info, res, need_features=need_features)
    net, generate, nfe = text_sampler(net, kind, cfg, decode, steps)
    prompts = class_prompts(cfg, net, info.device)
    return Evaluand(net, text_generate(generate, prompts), nfe, shape, label_dim, extractor, ref, decode, prompts)


def evaluate_network(cfg: dict, network: str | Path, kind: str, name: str, info: dist.DistInfo,
                     steps: int = 1, label: str | None = None, train_seed: int | None = None,
                     keep: tuple[Path, str] | None = None) -> tuple[dict, torch.Tensor | None]:
    """Evaluate a network file over `num_runs` runs of `num_samples` samples.

    Returns (metrics dict for metrics.json, the sample grid in [-1, 1] on the main process, else
    None). All ranks take part; the metrics are complete on every rank. Every metric's summary
    carries its standard error over runs; `monitor` is the network's FD/FID at the training
    monitor's sample count, for plotting next to the training curves (see `_monitor_protocol`).
    `keep` (work dir, name): each finished run is kept there and taken on a rerun (`RunStore`).
    """
    from ..run.config import config_hash
    from .runstore import RunStore

    t0 = time.time()
    ev = cfg["evaluate"]
    e = prepare_evaluand(cfg, network, kind, info, steps, need_features=ev["precision_recall"])
    net, extractor, ref, decode, generate, nfe, label_dim = (e.net, e.extractor, e.ref, e.decode, e.generate, e.nfe,
                                                             e.label_dim)
    # Text networks on class-labelled data: how often the classifier reads a sample as its prompt's class.
    alignment = e.zero_shot is None and e.prompts is not None and extractor.has_probs
    ch, res, _ = e.shape
    extras = _extra_metrics(cfg, info, res, ch, str(network))
    notes = ref.notes + [n for _, xref in extras for n in xref.notes]
    for note in notes:
        if info.is_main:
            print(f"[evaluate] {note}", file=sys.stderr, flush=True)
    # the noise levels a generator is sampled at (its network file's, see make_generate)
    sigmas = sampling_sigmas(generator_sigmas(net, cfg["distill"]["sigma_init"]), steps) if kind == "generator" else None
    key = extractor.metric_key
    ranges = seed_ranges(ev["seed"], ev["num_runs"], ev["num_samples"])
    store = None if keep is None else RunStore(*keep, key={
        "cfg": config_hash(cfg), "network": sha256_file(network), "kind": kind, "steps": steps,
        "world_size": info.world_size}, info=info)
    runs, head = [], []
    for r, seeds in enumerate(ranges):
        kept = store.load(r) if store is not None else None
        if kept is None:
            desc, clip = f"{name} run {r + 1}/{len(ranges)}", None
            if e.zero_shot is not None:  # each seed's caption; no extra feature networks (refused)
                feats, probs, clip = zero_shot_run(e.zero_shot, extractor, generate, seeds, (ch, res, res), ev["batch"],
                                                   info, desc, want_probs=ev["inception_score"], latents=ev["latents"])
                extra_feats = []
            else:
                (feats, probs), *extra_feats = extract_generated_multi(
                    [extractor] + [x for x, _ in extras], generate, seeds, (ch, res, res), label_dim, ev["batch"],
                    info, desc=desc, want_probs=ev["inception_score"] or alignment, labels=ev["labels"],
                    latents=ev["latents"])
            run_head = feats[:max(0, ev["during_training"]["num_samples"] - sum(len(h) for h in head))]
            scores = score_run(ref, feats, probs, cfg, key, info.device) if info.is_main else {}
            if alignment and info.is_main:
                _, onehot = latents_for_seeds(seeds, (ch, res, res), label_dim, "cpu", ev["labels"])
                scores["alignment"] = prompt_alignment(torch.as_tensor(probs), onehot.argmax(dim=1))
            if clip is not None and info.is_main:  # CLIP score: the run's mean raw cosine
                scores["clip_score"] = float(clip.mean())
            if info.is_main:  # the extra feature networks' Fréchet distances of the same samples
                for (x, xref), (xf, _) in zip(extras, extra_feats):
                    scores[x.metric_key] = frechet_distance(*feature_stats(xf), xref.mu, xref.sigma)
            scores = dist.broadcast_object(scores)
            if store is not None:
                store.save(r, scores, run_head)
        else:
            scores, run_head = kept
        head.append(run_head)
        runs.append({"run": r, "seeds": [seeds.start, seeds.stop - 1], **scores,
                     "class_counts": class_counts(seeds, (ch, res, res), label_dim, ev["labels"])})
        if info.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            how = f" (kept from {store.path(r)})" if kept is not None else ""
            print(f"[evaluate] {name} run {r + 1}/{len(ranges)}: {shown}{how}", file=sys.stderr, flush=True)
    summary = {k: summarize([run[k] for run in runs]) for k in runs[0] if k not in ("run", "seeds", "class_counts")}
    monitor = _monitor_protocol(cfg, np.concatenate(head), ref, key, ranges[0].start) if info.is_main else None
    monitor = dist.broadcast_object(monitor)
    grid = sample_grid(net, kind, cfg, decode, sigmas, e.prompts).cpu() if info.is_main else None
    metrics = {
        "name": name, "kind": kind, "train_seed": train_seed, "network": str(network),
        "network_sha256": sha256_file(network),
        "nfe": nfe, "teacher_steps": ev["teacher_steps"] if kind == "teacher" else None,
        "label": label or name, "steps": steps if kind == "generator" else ev["teacher_steps"],
        "sigmas": sigmas, "sigma_init": sigmas[0] if sigmas else None,
        "metric": key, "metric_label": extractor.label, "mode": extractor.mode,
        "extractor": extractor.info, "reference": ref.info, "notes": notes,
        "zero_shot": None if e.zero_shot is None else e.zero_shot.info,
        "extra_metrics": [{"metric": x.metric_key, "metric_label": x.label, "mode": x.mode, "extractor": x.info,
                           "reference": xref.info} for x, xref in extras],
        "num_runs": ev["num_runs"], "num_samples": ev["num_samples"], "labels": ev["labels"], "latents": ev["latents"],
        "seeds": [[s.start, s.stop - 1] for s in ranges],
        "seed_note": seed_note(ev["labels"], ev["latents"]),
        "class_conditional": label_dim > 0, "label_dim": label_dim,
        "runs": runs, "summary": summary, "std_ddof": 1, "se_note": "se = std / sqrt(num_runs): of the mean over runs",
        "monitor": monitor,
        "config_hash": config_hash(cfg), "experiment": cfg["experiment"], "world_size": info.world_size,
        "device": str(info.device), "elapsed_s": round(time.time() - t0, 2),
    }
    return metrics, grid
