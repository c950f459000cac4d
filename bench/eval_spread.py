"""The evaluation's own spread: one network's FD/FID over independent evaluation runs, with each
kind of evaluation noise (`evaluate.latents`), side by side.

    python -m bench.eval_spread --config config/config.yaml --network results/digits/teacher/network.pt \
        --kind teacher --runs 6 --samples 2000,5120 --latents iid,sobol [--threads 1]

For every (noise, sample count) it evaluates `--runs` runs the way the evaluate stage does (the
config's labels, reference statistics and extractor; run r takes seeds start + r*n ...), from
seeds disjoint from the config's own evaluation seeds, and prints the mean, the std over runs and
the std as a percentage of the mean. This is where the spread figures of docs/evaluation.md and
docs/results.md come from. Last line: the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sida.errors import SidaError


def _list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    from sida.eval.evaluation import prepare_evaluand
    from sida.eval.extract import extract_generated
    from sida.eval.zero_shot_eval import zero_shot_run
    from sida.eval.metrics import feature_stats, frechet_distance
    from sida.eval.noise import LATENT_MODES, seed_ranges
    from sida.run import dist
    from sida.run.config import load_config

    p = argparse.ArgumentParser(prog="python -m bench.eval_spread", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment config (its data, evaluate and extractor settings)")
    p.add_argument("--network", required=True, help="network file to evaluate")
    p.add_argument("--kind", choices=["generator", "teacher"], default="generator")
    p.add_argument("--runs", type=int, default=6, help="independent evaluation runs per setting (>= 2)")
    p.add_argument("--samples", default="2000,5120", help="comma-separated samples per run")
    p.add_argument("--latents", default=",".join(LATENT_MODES), help="comma-separated noise kinds")
    p.add_argument("--seed", type=int, default=10_000_000,
                   help="first seed (default far from the evaluation's and the training monitor's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.runs < 2:
        raise SidaError("--runs: a spread needs at least 2 runs")
    latents = _list(args.latents, str)
    if unknown := set(latents) - set(LATENT_MODES):
        raise SidaError(f"--latents: unknown {sorted(unknown)} (known: {', '.join(LATENT_MODES)})")
    cfg = load_config(args.config, args.set)
    info = dist.init(cfg["device"], args.threads)  # one process (a group of one, as the stages make)
    e = prepare_evaluand(cfg, args.network, args.kind, info)  # as the evaluate stage scores
    ev, label_dim = cfg["evaluate"], e.label_dim
    if ev["labels"] == "balanced" and label_dim and any(n % label_dim for n in _list(args.samples, int)):
        raise SidaError(f"--samples: balanced labels need multiples of {label_dim}")
    results = []
    print(f"{args.network} ({args.kind}, {e.nfe} NFE), {ev['labels']} labels, {args.runs} runs each, "
          f"{e.extractor.label}", flush=True)
    for n in _list(args.samples, int):
        for mode in latents:
            t0, values = time.time(), []
            for seeds in seed_ranges(args.seed, args.runs, n):
                if e.zero_shot is not None:  # a text network on COCO captions: each seed's caption
                    feats = zero_shot_run(e.zero_shot, e.extractor, e.generate, seeds, e.shape, ev["batch"], info,
                                          desc=f"{mode} {n}", latents=mode)[0]
                else:
                    feats, _ = extract_generated(e.extractor, e.generate, seeds, e.shape, label_dim, ev["batch"],
                                                 info, desc=f"{mode} {n}", want_probs=False, labels=ev["labels"],
                                                 latents=mode)
                values.append(frechet_distance(*feature_stats(feats), e.ref.mu, e.ref.sigma))
            v = np.asarray(values)
            row = {"latents": mode, "samples": n, "runs": args.runs, "mean": float(v.mean()),
                   "std": float(v.std(ddof=1)), "relative_std": float(v.std(ddof=1) / v.mean()),
                   "values": [float(x) for x in v], "seconds": round(time.time() - t0, 1)}
            results.append(row)
            print(f"  {mode:6s} {n:7,d} samples: mean {row['mean']:.3f}  std {row['std']:.3f} "
                  f"({100 * row['relative_std']:.1f} % of the mean)  [{row['seconds']:.0f} s]", flush=True)
    dist.shutdown()
    print(json.dumps({"network": args.network, "kind": args.kind, "labels": ev["labels"], "results": results}))


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)  # errors (bad arguments, missing files) as one `error:` line
