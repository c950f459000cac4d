"""The authors' SiDA training iteration, run from their own source, on our teacher and digits.

    python -m bench.authors_sida --authors-repo /work/exp/authors/SiD \
        --teacher results/digits/teacher/network.pt --seed K --out DIR [--config config/config.yaml]

Issue 23, item 3: training curves against the authors' code (github.com/mingyuanzhou/SiD, branch
`sida`). Nothing of theirs is in this repository: their checkout is put on `sys.path` at run time
and `sida_training.sida_training_loop.training_loop` runs with their loss
(`SIDA_EDMLoss`), network (`EDMPrecond_EncoderDecoder` / `SongUNet_EncoderDecoder`), Adam, EMA,
gradient NaN guard and clip, on the CPU. The checkout must be at `bench.authors.AUTHORS_COMMIT`,
and a config whose runs set something their loop cannot carry (`UNCARRIED`) is refused. Run-time patches (their files are never edited):

- CUDA / multi-GPU calls become no-ops while their loop runs (`bench.authors.authors_runtime`).
- Their loop hard-codes its phases by image count (generator frozen to 100k, SiD to 200k, then
  SiDA). Its source is parsed (`ast`) and the two literals become names set from our run's
  phases; two calls are inserted, one before the loop (loads the shared warm-up's fake score) and
  one after each iteration's image count update (our training monitor, which converts and
  evaluates their EMA generator inside `isolated_rng`: their random streams do not move). The
  rest of the function runs as they wrote it.

Schedule (the `sida` run of the config, from the shared `warmup` run):
  A. shared warm-up: their loop with `use_gan=False` (the fake score on EDM's loss, their SiD
     path) at the warm-up run's lr_fake, the generator's lr 0 (their SiD path always steps G; lr
     0 leaves it the teacher, as our warm-up does);
  B. the sida run: their loop with `use_gan=True`, fake score from A, fresh Adam states (as ours),
     G frozen for the run's warm-up phase, SiD to the end of its sid phase, then SiDA.
Outputs in --out: metrics.jsonl (our format: in-run kimg, `fd`, `best_fd`, phase, at our
monitor's image counts), network.pt (the lowest-quick-FD EMA generator, our format, as our stage
selects), last.pt (the final EMA generator), port_check.json, authors_run/ (their loop's files).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench.authors import (authors_runtime, fail, isolated_rng, load_checkout, loop_kwargs, patched_training_loop,
                           serve, to_authors, to_ours)

HERE = Path(__file__).resolve().parent.parent

# Settings of our runs that their loop has no way to take, and the only value it runs as:
# key -> (accepted value, what their loop does). `fake_clip` only matters with a discriminator.
UNCARRIED: dict[str, tuple[Any, str]] = {
    "augment": (0.0, "augment_kwargs None (their AugmentPipe is not ours)"),
    "precision": ("fp32", "fp32"),
    "grad_clip": (None, "no generator clip"),
    "lr_warmup_kimg": (0, "constant learning rates"),
    "critic_ratio": (1, "one fake-score step per generator step"),
    "optimizer": ("adam", "torch.optim.Adam"),
    "weight_decay": (0.0, "no weight decay"),
    "logvar": (False, "no learned loss weighting"),
    "fake_clip": (1.0, "clip_grad_value_ 1 on the fake score when use_gan"),
}


def uncarried(rc: dict, run: str) -> list[str]:
    """'key=value' of each setting of run `run` (its resolved config `rc`) their loop cannot carry."""
    bad = []
    for key, (want, _) in UNCARRIED.items():
        if key == "fake_clip" and not rc.get("discriminator"):
            continue  # our loop clips the fake score only in runs with a discriminator, theirs with use_gan
        if rc.get(key, want) != want:
            bad.append(f"{run}.{key}={rc[key]!r} (their loop: {UNCARRIED[key][1]}, {key}: {want!r})")
    return bad


@torch.no_grad()
def port_check(ours: torch.nn.Module, theirs: torch.nn.Module, n: int = 256, seed: int = 123) -> dict:
    """Max |ours - theirs| of D(x; sigma, labels) and of the encoder logits on random inputs."""
    g = torch.Generator().manual_seed(seed)
    C, R, L = ours.img_channels, ours.img_resolution, ours.label_dim
    sigma = (torch.randn(n, generator=g) * 1.2 - 1.2).exp().clamp(0.002, 80)
    sigma[:8] = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 2.5, 10.0, 80.0])
    x = torch.randn(n, C, R, R, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    labels = torch.nn.functional.one_hot(torch.randint(L, (n,), generator=g), L).float()
    d_o, l_o = ours(x, sigma, labels, return_flag="encoder_decoder")
    d_t, l_t = theirs(x, sigma.reshape(-1, 1, 1, 1), labels, return_flag="encoder_decoder")
    l_enc_o = ours(x, sigma, labels, return_flag="encoder")
    l_enc_t = theirs(x, sigma.reshape(-1, 1, 1, 1), labels, return_flag="encoder")
    return {"n": n, "D_shape": list(d_o.shape), "logits_shape_ours": list(l_o.shape),
            "logits_shape_theirs": list(l_t.shape),
            "max_abs_D": float((d_o - d_t).abs().max()), "max_abs_D_rel": float((d_o - d_t).abs().max() / d_t.abs().max()),
            "max_abs_logits": float((l_o - l_t).abs().max()), "max_abs_logits_encoder_only": float((l_enc_o - l_enc_t).abs().max()),
            "max_abs_logits_value": float(l_t.abs().max())}



class Monitor:
    """Our training monitor at our stage's image counts (ticks every tick_kimg, a quick FD every
    `every_nimg` outside warm-up, stages/distill.py BestKeeper) on their EMA generator. `fd` scores
    one of our generators. Conversion and evaluation run inside `isolated_rng`: building our
    network draws its initial weights from torch's global generator, which their loop also uses."""

    def __init__(self, fd: Callable[[torch.nn.Module], float], rc: dict, like: torch.nn.Module, out: Path,
                 phase_of: Callable[[int], str], every_nimg: int) -> None:
        self.fd, self.rc, self.like, self.phase_of = fd, rc, like, phase_of
        self.tick_nimg, self.every = int(rc["tick_kimg"] * 1000), every_nimg
        self.total = int(round(sum(p["kimg"] for p in rc["phases"]) * 1000))
        self.tick_start, self.last, self.best, self.best_state, self.best_kimg = 0, 0, math.inf, None, None
        self.path = out / "metrics.jsonl"
        self.path.unlink(missing_ok=True)
        self.t0 = time.time()

    def __call__(self, cur_nimg: int, G: Any, G_ema: Any, fake_score: Any) -> None:
        batch = self.rc["batch"]
        done = cur_nimg >= self.total
        if not (cur_nimg - self.tick_start >= self.tick_nimg or done):
            return
        self.tick_start = cur_nimg
        phase = self.phase_of(cur_nimg - batch)  # the iteration just run
        row: dict[str, Any] = {"kimg": cur_nimg / 1000, "phase": phase, "seconds": round(time.time() - self.t0, 1)}
        if phase != "warmup" and cur_nimg // self.every != self.last // self.every:
            with isolated_rng():  # their streams must not move
                net = to_ours(G_ema, self.like)
                v = self.fd(net)
            self.last = cur_nimg
            if v < self.best:
                self.best, self.best_kimg = v, cur_nimg / 1000
                self.best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
            row.update(fd=v, best_fd=self.best)
            print(f"authors sida: kimg {cur_nimg / 1000:7.3f} {phase:<6} fd {v:.4f} (best {self.best:.4f} at "
                  f"{self.best_kimg:.3f})", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser("python -m bench.authors_sida", description=__doc__.split("\n\n")[1])
    p.add_argument("--authors-repo", required=True, type=Path, help="checkout of github.com/mingyuanzhou/SiD at bench.authors.AUTHORS_COMMIT")
    p.add_argument("--teacher", required=True, type=Path, help="our teacher network.pt (stages.teacher)")
    p.add_argument("--seed", type=int, default=0, help="training seed (their loop's `seed`; the sida run uses seed+1000)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=HERE / "config" / "config.yaml")
    p.add_argument("--run", default="sida", help="the run of distill.runs to reproduce (default sida)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as the stages take it (default adds results_dir=<out>/results: the "
                        "monitor's classifier and reference caches; pass ours to share them)")
    p.add_argument("--port-check-only", action="store_true", help="port the teacher, compare D and logits, stop")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    commit = load_checkout(a.authors_repo)
    if not a.teacher.is_file():
        fail(f"--teacher {a.teacher} does not exist: train it with the teacher stage (docs/authors-code.md)")
    from sida.io.checkpoints import load_network, save_network
    from sida.io.data import open_dataset
    from sida.run.config import load_config, run_config
    from sida.run.dist import init as dist_init

    sets = list(a.set) if any(x.startswith("results_dir=") for x in a.set) else [*a.set, f"results_dir={a.out / 'results'}"]
    cfg = load_config(a.config, sets)
    rc = run_config(cfg, a.run)
    if rc["init"] == "teacher" or not rc["discriminator"]:
        fail(f"run '{a.run}' is not a SiDA run from a shared warm-up (init: {rc['init']}, discriminator: "
             f"{rc['discriminator']}): this harness reproduces the default's `sida` run")
    wrc = run_config(cfg, rc["init"])
    bad = uncarried(wrc, rc["init"]) + uncarried(rc, a.run)
    if bad:
        fail(f"the authors' loop cannot carry {'; '.join(bad)}: set these back for the comparison")
    dist_init("cpu", a.threads)  # a one-process group, as our stages start one (the monitor broadcasts)
    teacher = load_network(a.teacher).eval()
    a.out.mkdir(parents=True, exist_ok=True)
    theirs = to_authors(teacher)
    check = {"authors_commit": commit, **port_check(teacher, theirs)}
    (a.out / "port_check.json").write_text(json.dumps(check, indent=1) + "\n")
    print(f"port check: {check}", flush=True)
    if a.port_check_only:
        return
    digits = open_dataset(cfg["data"])
    dataset_class = serve(digits._images, digits._raw_labels)
    teacher_pkl = a.out / "authors_run" / "teacher.pkl"
    teacher_pkl.parent.mkdir(parents=True, exist_ok=True)
    with open(teacher_pkl, "wb") as f:
        pickle.dump({"ema": theirs}, f)
    for r in (rc, wrc):
        r["teacher_kwargs"] = teacher.init_kwargs
    # A. the shared warm-up (their SiD path, generator lr 0); keep its fake score.
    w_total = int(round(sum(q["kimg"] for q in wrc["phases"]) * 1000))
    warm: dict = {}
    def keep(cur_nimg: int, G: Any, G_ema: Any, fake_score: Any) -> None:
        if cur_nimg >= w_total:
            warm["fake"] = {k: v.detach().clone() for k, v in fake_score.state_dict().items()}
    loop_a = patched_training_loop(0, 0, lambda **k: None, keep)
    print(f"authors warm-up: {w_total} images, fake-score lr {wrc['lr_fake']}, use_gan False, G lr 0", flush=True)
    with authors_runtime():
        loop_a(**loop_kwargs(wrc, a.out / "authors_run" / "warmup", teacher_pkl, a.seed, w_total, False, 0.0,
                             dataset_class))
    # B. the sida run: phase boundaries from its phases.
    ends, e = {}, 0
    for q in rc["phases"]:
        e += int(round(q["kimg"] * 1000))
        ends.setdefault(q["kind"], e)
    if [q["kind"] for q in rc["phases"]] != ["warmup", "sid", "sida"]:
        fail(f"run '{a.run}' phases must be warmup, sid, sida (their loop's order), not {rc['phases']}")
    g_start, gan_start, total = ends["warmup"], ends["sid"], e
    phase_of = lambda c: "warmup" if c <= g_start else ("sid" if c <= gan_start else "sida")
    from sida.eval.monitor import TrainingMonitor
    from sida.nets.sampler import one_step_generate
    from sida.run.dist import DistInfo

    monitor = TrainingMonitor(cfg, torch.device("cpu"), DistInfo(0, 1, 0, torch.device("cpu")))
    fd = lambda net: monitor(lambda z, c: one_step_generate(net, z, c, sigma_init=rc["sigma_init"]))["fd"]
    mon = Monitor(fd, rc, teacher, a.out, phase_of, int(monitor.every_kimg * 1000))
    final: dict = {}
    def on_iteration(cur_nimg: int, G: Any, G_ema: Any, fake_score: Any) -> None:
        mon(cur_nimg, G, G_ema, fake_score)
        if cur_nimg >= total:
            with isolated_rng():
                final["G_ema"] = to_ours(G_ema, teacher)
    def on_start(fake_score: Any, true_score: Any, **_: Any) -> None:
        fake_score.load_state_dict(warm["fake"])
        moved = max(float((p - q).abs().max()) for p, q in zip(fake_score.parameters(), true_score.parameters()))
        print(f"authors sida: fake score from the warm-up (max |fake - teacher| over parameters {moved:.3g})", flush=True)

    loop_b = patched_training_loop(g_start, gan_start, on_start, on_iteration)
    print(f"authors sida: G frozen to {g_start}, SiD to {gan_start}, SiDA to {total} images; seed {a.seed + 1000}",
          flush=True)
    with authors_runtime():
        loop_b(**loop_kwargs(rc, a.out / "authors_run" / "sida", teacher_pkl, a.seed + 1000, total, True,
                             rc["lr_g"], dataset_class))
    meta = {"stage": "bench.authors_sida", "run": f"{a.run}-authors", "kimg": total / 1000, "experiment": cfg["experiment"],
            "sigma_init": rc["sigma_init"], "gen_sigmas": rc["gen_sigmas"], "method": "sid", "ema": True,
            "one_step": True, "authors_commit": commit, "seed": a.seed}
    save_network(a.out / "last.pt", final["G_ema"], meta=meta)
    best = copy.deepcopy(final["G_ema"])
    best.load_state_dict(mon.best_state)
    save_network(a.out / "network.pt", best, meta={**meta, "selected": "lowest fd during training",
                                                   "kimg": mon.best_kimg, "fd": mon.best})
    print(f"authors sida: network.pt is the best generator (fd {mon.best:.4f} at {mon.best_kimg:.3f} kimg); "
          f"the final one is last.pt", flush=True)


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)  # config and file errors as one `error:` line
