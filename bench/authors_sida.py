"""The authors' SiDA training iteration, run from their own source, on our teacher and digits.

    python -m bench.authors_sida --authors-repo /work/exp/authors/SiD \
        --teacher results/digits/teacher/network.pt --seed K --out DIR [--config config/config.yaml]

Issue 23, item 3: training curves against the authors' code (github.com/mingyuanzhou/SiD, branch
`sida`). Nothing of theirs is in this repository: their checkout is put on `sys.path` at run time
and `sida_training.sida_training_loop.training_loop` runs with their loss
(`SIDA_EDMLoss`), network (`EDMPrecond_EncoderDecoder` / `SongUNet_EncoderDecoder`), Adam, EMA,
gradient NaN guard and clip, on the CPU. Run-time patches (their files are never edited):

- CUDA / multi-GPU: `torch.cuda` memory counters return 0, `torch.distributed.barrier` is a
  no-op, `DistributedDataParallel` is a pass-through wrapper (one process: DDP's all-reduce over
  one rank is the identity); `torch.utils.data.Sampler.__init__` accepts (and ignores) the
  dataset their `InfiniteSampler` passes it (torch 2.14 takes no argument there).
- Their loop hard-codes its phases by image count (generator frozen to 100k, SiD to 200k, then
  SiDA). Its source is parsed (`ast`) and the two literals become names set from our run's
  phases; two calls are inserted, one before the loop (loads the shared warm-up's fake score) and
  one after each iteration's image count update (our training monitor). The rest of the
  function runs as they wrote it.

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
import ast
import contextlib
import copy
import inspect
import json
import math
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent.parent
_DIGITS: Any = None  # our DigitsDataset, set by main() before their loop builds its dataset


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def check_checkout(repo: Path) -> str:
    """The commit of a checkout of the authors' `sida` branch; exits with one line otherwise."""
    if not repo.is_dir():
        fail(f"--authors-repo {repo} does not exist: check out the authors' code first, e.g. "
             f"git --git-dir=/work/.mirror/mingyuanzhou+SiD/repo worktree add {repo} sida")
    if not (repo / "sida_training" / "sida_training_loop.py").is_file():
        fail(f"--authors-repo {repo} has no sida_training/sida_training_loop.py: it is not the SiD "
             f"repository's `sida` branch (git -C {repo} checkout sida)")
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    commit = git("rev-parse", "HEAD")
    if branch != "sida" and git("rev-parse", "sida") != commit:
        fail(f"--authors-repo {repo} is on '{branch or 'no git branch'}', not the authors' `sida` branch: "
             f"git -C {repo} checkout sida")
    return commit or "unknown"


class PassThroughDDP(torch.nn.Module):
    """DistributedDataParallel for one CPU process: forwards to `.module`, syncs nothing."""

    def __init__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield


def patch_runtime() -> None:
    """CPU, one process: the CUDA / distributed calls of their loop become no-ops (see module doc)."""
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.distributed.barrier = lambda *a, **k: None
    torch.nn.parallel.DistributedDataParallel = PassThroughDDP
    # Their InfiniteSampler calls Sampler.__init__(dataset), an argument torch 2.14 no longer takes.
    torch.utils.data.Sampler.__init__ = lambda self, *a, **k: None


def make_dataset(**kwargs: Any) -> Any:
    """Our digits (sida.io.data, [-1, 1]) behind their `training.dataset.Dataset` interface.

    Their loop maps images by x / 127.5 - 1, so items are float32 (x + 1) * 127.5 (digits are
    multiples of 1/8: not integers in 0..255), CHW, with one-hot labels."""
    from training.dataset import Dataset  # theirs (EDM's), from the checkout on sys.path

    digits = _DIGITS

    class AuthorsDigits(Dataset):
        def __init__(self) -> None:
            x = digits._images.numpy()
            self._x = ((x + 1) * 127.5).astype(np.float32)
            super().__init__(name="digits", raw_shape=list(self._x.shape), use_labels=True)

        def _load_raw_image(self, raw_idx: int) -> np.ndarray:
            return self._x[raw_idx]

        def _load_raw_labels(self) -> np.ndarray:
            return np.asarray(digits._raw_labels, dtype=np.int64)

        def __getitem__(self, idx: int):
            raw = self._raw_idx[idx]
            return self._x[raw].copy(), self.get_label(idx)

    return AuthorsDigits()


def to_authors(ours: torch.nn.Module) -> torch.nn.Module:
    """Their EDMPrecond_EncoderDecoder(SongUNet_EncoderDecoder) with our network's weights."""
    from sida_training.sida_networks import EDMPrecond_EncoderDecoder

    kw = dict(ours.init_kwargs)
    if kw.get("model_type") != "SongUNet":
        fail(f"the teacher is a {kw.get('model_type')}: this harness ports SongUNet (DDPM++) teachers only")
    kw["model_type"] = "SongUNet_EncoderDecoder"
    net = EDMPrecond_EncoderDecoder(**kw)
    net.load_state_dict(ours.state_dict(), strict=True)  # the same EDM layout (sida/io/edm_pickle.py)
    return net.eval().requires_grad_(False)


def to_ours(theirs: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """Our EDMPrecond with their network's weights (strict: every tensor name must match)."""
    from sida.io.checkpoints import network_from_record

    sd = {k: v.detach().cpu().clone() for k, v in theirs.state_dict().items()}
    return network_from_record({"class": type(like).__name__, "kwargs": like.init_kwargs, "state_dict": sd})


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


class _Patch(ast.NodeTransformer):
    """100*1000 / 200*1000 -> _G_START_NIMG / _GAN_START_NIMG; the two hooks (module doc)."""

    LITERALS = {100 * 1000: "_G_START_NIMG", 200 * 1000: "_GAN_START_NIMG"}

    def __init__(self) -> None:
        self.count = {"literals": 0, "start": 0, "iteration": 0}

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if (isinstance(node.op, ast.Mult) and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
                and node.left.value * node.right.value in self.LITERALS and node.right.value == 1000):
            self.count["literals"] += 1
            return ast.Name(self.LITERALS[node.left.value * node.right.value], ast.Load())
        return node

    @staticmethod
    def _call(name: str, args: Sequence[str]) -> ast.stmt:
        return ast.parse(f"{name}({', '.join(f'{a}={a}' for a in args)})").body[0]

    def _rewrite(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out = []
        for st in body:
            if isinstance(st, ast.While):
                out.append(self._call("_AUTHORS_START", ["G", "G_ema", "fake_score", "true_score"]))
                self.count["start"] += 1
                st.body = self._rewrite(st.body)
            out.append(st)
            if (isinstance(st, ast.AugAssign) and isinstance(st.target, ast.Name) and st.target.id == "cur_nimg"
                    and isinstance(st.value, ast.Name) and st.value.id == "batch_size"):
                out.append(self._call("_AUTHORS_ITERATION", ["cur_nimg", "G", "G_ema", "fake_score"]))
                self.count["iteration"] += 1
        return out

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = self._rewrite(node.body)
        return node


def patched_training_loop(g_start: int, gan_start: int, on_start: Callable, on_iteration: Callable) -> Callable:
    """Their `training_loop`, compiled from their source with the phase literals and hooks above."""
    import sida_training.sida_training_loop as stl

    tree = ast.parse(inspect.getsource(stl.training_loop))
    patch = _Patch()
    tree = ast.fix_missing_locations(patch.visit(tree))
    if patch.count != {"literals": 2, "start": 1, "iteration": 1}:
        fail(f"the authors' training_loop no longer has the structure this harness patches ({patch.count}): "
             f"check out the commit named in docs/authors-code.md")
    ns = dict(vars(stl), _G_START_NIMG=g_start, _GAN_START_NIMG=gan_start,
              _AUTHORS_START=on_start, _AUTHORS_ITERATION=on_iteration)
    exec(compile(tree, stl.__file__, "exec"), ns)
    return ns["training_loop"]


def loop_kwargs(rc: dict, cfg: dict, run_dir: Path, teacher_pkl: Path, seed: int, total_nimg: int,
                use_gan: bool, lr_g: float) -> dict:
    """Their loop's arguments for one of our runs (the mapping table of docs/authors-code.md)."""
    net_kw = {k: v for k, v in rc["teacher_kwargs"].items() if k not in ("img_resolution", "img_channels", "label_dim")}
    net_kw.update(class_name="sida_training.sida_networks.EDMPrecond_EncoderDecoder", model_type="SongUNet_EncoderDecoder")
    if rc["dropout"] is not None:
        net_kw["dropout"] = rc["dropout"]
    adam = dict(class_name="torch.optim.Adam", eps=rc["adam_eps"] or 1e-8)
    run_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        run_dir=str(run_dir), dataset_kwargs=dict(class_name="bench.authors_sida.make_dataset"), data_loader_kwargs={},
        network_kwargs=net_kw, loss_kwargs=dict(class_name="sida_training.sida_loss.SIDA_EDMLoss", P_mean=rc["P_mean"],
                                                P_std=rc["P_std"]),
        fake_score_optimizer_kwargs=dict(adam, lr=rc["lr_fake"], betas=[rc["beta1_fake"], rc["beta2"]]),
        g_optimizer_kwargs=dict(adam, lr=lr_g, betas=[rc["beta1_g"], rc["beta2"]]),
        augment_kwargs=None, seed=seed, batch_size=rc["batch"], batch_gpu=None, total_kimg=total_nimg / 1000,
        ema_halflife_kimg=rc["ema_halflife_kimg"], ema_rampup_ratio=rc["ema_rampup_ratio"], loss_scaling=1,
        loss_scaling_G=rc["lambda_sid"], kimg_per_tick=10 ** 6, snapshot_ticks=None, state_dump_ticks=None,
        resume_pkl=str(teacher_pkl), alpha=rc["alpha"], tmax=rc["tmax"], cudnn_benchmark=False,
        device=torch.device("cpu"), metrics=None, init_sigma=rc["sigma_init"], loss_scaling_G_gan=rc["lambda_adv"],
        loss_scaling_D=rc["lambda_d"], use_gan=use_gan, save_best_and_last=False)


class Monitor:
    """Our training monitor at our stage's image counts (ticks every tick_kimg, a quick FD every
    every_kimg outside warm-up, stages/distill.py BestKeeper) on their EMA generator."""

    def __init__(self, cfg: dict, rc: dict, like: torch.nn.Module, out: Path, phase_of: Callable[[int], str]) -> None:
        from sida.eval.monitor import TrainingMonitor
        from sida.run.dist import DistInfo

        self.monitor = TrainingMonitor(cfg, torch.device("cpu"), DistInfo(0, 1, 0, torch.device("cpu")))
        self.rc, self.like, self.phase_of = rc, like, phase_of
        self.tick_nimg, self.every = int(rc["tick_kimg"] * 1000), int(self.monitor.every_kimg * 1000)
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
            net = to_ours(G_ema, self.like)
            np_state = np.random.get_state()
            with torch.random.fork_rng(devices=[]):  # their streams must not move
                from sida.nets.sampler import one_step_generate
                v = self.monitor(lambda z, c: one_step_generate(net, z, c, sigma_init=self.rc["sigma_init"]))["fd"]
            np.random.set_state(np_state)
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
    global _DIGITS
    p = argparse.ArgumentParser("python -m bench.authors_sida", description=__doc__.split("\n\n")[1])
    p.add_argument("--authors-repo", required=True, type=Path, help="checkout of github.com/mingyuanzhou/SiD, branch sida")
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
    repo = a.authors_repo.resolve()
    commit = check_checkout(repo)
    if not a.teacher.is_file():
        fail(f"--teacher {a.teacher} does not exist: train it with the teacher stage (docs/authors-code.md)")
    sys.path.insert(0, str(repo))
    from sida.io.checkpoints import load_network, save_network
    from sida.io.data import open_dataset
    from sida.run.config import load_config, run_config

    from sida.run.dist import init as dist_init

    dist_init("cpu", a.threads)  # a one-process group, as our stages start one (the monitor broadcasts)
    patch_runtime()
    sets = list(a.set) if any(x.startswith("results_dir=") for x in a.set) else [*a.set, f"results_dir={a.out / 'results'}"]
    cfg = load_config(a.config, sets)
    rc = run_config(cfg, a.run)
    if rc["init"] == "teacher" or not rc["discriminator"]:
        fail(f"run '{a.run}' is not a SiDA run from a shared warm-up (init: {rc['init']}, discriminator: "
             f"{rc['discriminator']}): this harness reproduces the default's `sida` run")
    wrc = run_config(cfg, rc["init"])
    teacher = load_network(a.teacher).eval()
    a.out.mkdir(parents=True, exist_ok=True)
    theirs = to_authors(teacher)
    check = {"authors_commit": commit, **port_check(teacher, theirs)}
    (a.out / "port_check.json").write_text(json.dumps(check, indent=1) + "\n")
    print(f"port check: {check}", flush=True)
    if a.port_check_only:
        return
    _DIGITS = open_dataset(cfg["data"])
    sys.modules.setdefault("bench.authors_sida", sys.modules[__name__])  # their loop builds the dataset by name
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
    loop_a(**loop_kwargs(wrc, cfg, a.out / "authors_run" / "warmup", teacher_pkl, a.seed, w_total, False, 0.0))
    # B. the sida run: phase boundaries from its phases.
    ends, e = {}, 0
    for q in rc["phases"]:
        e += int(round(q["kimg"] * 1000))
        ends.setdefault(q["kind"], e)
    if [q["kind"] for q in rc["phases"]] != ["warmup", "sid", "sida"]:
        fail(f"run '{a.run}' phases must be warmup, sid, sida (their loop's order), not {rc['phases']}")
    g_start, gan_start, total = ends["warmup"], ends["sid"], e
    phase_of = lambda c: "warmup" if c <= g_start else ("sid" if c <= gan_start else "sida")
    mon = Monitor(cfg, rc, teacher, a.out, phase_of)
    final: dict = {}
    def on_iteration(cur_nimg: int, G: Any, G_ema: Any, fake_score: Any) -> None:
        mon(cur_nimg, G, G_ema, fake_score)
        if cur_nimg >= total:
            final["G_ema"] = to_ours(G_ema, teacher)
    def on_start(fake_score: Any, true_score: Any, **_: Any) -> None:
        fake_score.load_state_dict(warm["fake"])
        moved = max(float((p - q).abs().max()) for p, q in zip(fake_score.parameters(), true_score.parameters()))
        print(f"authors sida: fake score from the warm-up (max |fake - teacher| over parameters {moved:.3g})", flush=True)

    loop_b = patched_training_loop(g_start, gan_start, on_start, on_iteration)
    print(f"authors sida: G frozen to {g_start}, SiD to {gan_start}, SiDA to {total} images; seed {a.seed + 1000}",
          flush=True)
    loop_b(**loop_kwargs(rc, cfg, a.out / "authors_run" / "sida", teacher_pkl, a.seed + 1000, total, True, rc["lr_g"]))
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
    main()
