"""The authors' SiDA training loop, run from their own checkout: what bench.authors_sida (training
curves, docs/authors-code.md) and bench.authors_iteration (the speed yardstick of bench.compare)
share.

Nothing of theirs is in this repository (their licence): a checkout of github.com/mingyuanzhou/SiD
at AUTHORS_COMMIT is put on `sys.path` at run time and `sida_training.sida_training_loop.
training_loop` is compiled from its own source with a few run-time changes (`patched_training_loop`);
their files are never edited. The CUDA / multi-GPU calls their set-up makes become no-ops inside
`authors_runtime()` only, so our own code in the same process keeps torch as it is.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

# The commit docs/authors-code.md was measured with; another one may loop differently.
AUTHORS_COMMIT = "a5510fdfb1b2d4ec6e47335a69d375dfefd7a63a"
FETCH_HINT = (f"git clone https://github.com/mingyuanzhou/SiD SiD-git && "
              f"git -C SiD-git worktree add <dir> {AUTHORS_COMMIT}")


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def check_checkout(repo: Path) -> str:
    """AUTHORS_COMMIT if `repo` is a checkout of it; exits with one line otherwise."""
    if not repo.is_dir():
        fail(f"--authors-repo {repo} does not exist: check out the authors' code first: {FETCH_HINT}")
    if not (repo / "sida_training" / "sida_training_loop.py").is_file():
        fail(f"--authors-repo {repo} has no sida_training/sida_training_loop.py: it is not the SiD "
             f"repository's `sida` branch (git -C {repo} checkout {AUTHORS_COMMIT})")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if commit != AUTHORS_COMMIT:
        fail(f"--authors-repo {repo} is at {commit or 'no git commit'}, not the authors' commit "
             f"{AUTHORS_COMMIT} this harness is pinned to: git -C {repo} checkout {AUTHORS_COMMIT}")
    return commit


def load_checkout(repo: Path) -> str:
    """check_checkout, then their packages importable (their checkout first on sys.path)."""
    commit = check_checkout(repo.resolve())
    if str(repo.resolve()) not in sys.path:
        sys.path.insert(0, str(repo.resolve()))
    return commit


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Whatever runs inside draws from torch's, numpy's and Python's global generators without
    moving them: the authors' loop draws from all three, our monitor must leave them as found."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class PassThroughDDP(torch.nn.Module):
    """DistributedDataParallel for one CPU process: forwards to `.module`, syncs nothing (DDP's
    all-reduce over one rank is the identity)."""

    def __init__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def authors_runtime() -> Iterator[None]:
    """Their loop's CUDA / distributed calls as one CPU process, restored on exit: GPU memory
    counters 0, barrier a no-op, DDP a pass-through, their world one process (also when our own
    code runs a process group around it), and `Sampler.__init__` taking the dataset their
    InfiniteSampler passes (torch 2.14 takes no argument there)."""
    from torch_utils import distributed as their_dist

    patches = [(torch.cuda, "max_memory_allocated", lambda *a, **k: 0),
               (torch.cuda, "max_memory_reserved", lambda *a, **k: 0),
               (torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None),
               (torch.distributed, "barrier", lambda *a, **k: None),
               (torch.nn.parallel, "DistributedDataParallel", PassThroughDDP),
               (torch.utils.data.Sampler, "__init__", lambda self, *a, **k: None),
               (their_dist, "get_world_size", lambda: 1), (their_dist, "get_rank", lambda: 0)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


_SERVED: tuple[np.ndarray, np.ndarray | None] | None = None  # set by serve(), read by make_dataset()


def serve(images: torch.Tensor, labels: np.ndarray | None) -> str:
    """Images in [-1, 1] (NCHW) and int class labels (or None) for their loop's dataset; returns
    the `dataset_kwargs.class_name` that builds it."""
    global _SERVED
    _SERVED = (((images.numpy() + 1) * 127.5).astype(np.float32), labels)
    return "bench.authors.make_dataset"


def make_dataset(**kwargs: Any) -> Any:
    """The served images behind their `training.dataset.Dataset` interface. Their loop maps items
    by x / 127.5 - 1, so items are float32 (x + 1) * 127.5 (digits are multiples of 1/8, not
    integers in 0..255, hence the overridden `__getitem__`: their base class asserts uint8)."""
    from training.dataset import Dataset  # theirs (EDM's), from the checkout on sys.path

    x, labels = _SERVED

    class Served(Dataset):
        def __init__(self) -> None:
            super().__init__(name="served", raw_shape=list(x.shape), use_labels=labels is not None)

        def _load_raw_image(self, raw_idx: int) -> np.ndarray:
            return x[raw_idx]

        def _load_raw_labels(self) -> np.ndarray | None:
            return None if labels is None else np.asarray(labels, dtype=np.int64)

        def __getitem__(self, idx: int):
            return x[self._raw_idx[idx]].copy(), self.get_label(idx)

    return Served()


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
    """Our EDMPrecond with their network's weights (strict: every tensor name must match).
    Building it initialises weights from torch's global generator: call inside isolated_rng()
    while their loop runs."""
    from sida.io.checkpoints import network_from_record

    sd = {k: v.detach().cpu().clone() for k, v in theirs.state_dict().items()}
    return network_from_record({"class": type(like).__name__, "kwargs": like.init_kwargs, "state_dict": sd})


class _Patch(ast.NodeTransformer):
    """100*1000 / 200*1000 -> _G_START_NIMG / _GAN_START_NIMG; `_AUTHORS_START(...)` before the
    `while` loop; `_AUTHORS_ITERATION(...)` (and, with `pause`, a `yield`) after each iteration's
    `cur_nimg += batch_size`."""

    LITERALS = {100 * 1000: "_G_START_NIMG", 200 * 1000: "_GAN_START_NIMG"}

    def __init__(self, pause: bool) -> None:
        self.pause = pause
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
                if self.pause:
                    out.append(ast.Expr(ast.Yield(None)))
                self.count["iteration"] += 1
        return out

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = self._rewrite(node.body)
        return node


def patched_training_loop(g_start: int, gan_start: int, on_start: Callable, on_iteration: Callable,
                          pause: bool = False) -> Callable:
    """Their `training_loop`, compiled from their source with the phase literals and hooks of
    `_Patch`. With `pause` it is a generator function: each `next()` runs one iteration of their
    while-body (the first also their set-up), so a caller can time iterations one by one."""
    import sida_training.sida_training_loop as stl

    tree = ast.parse(inspect.getsource(stl.training_loop))
    patch = _Patch(pause)
    tree = ast.fix_missing_locations(patch.visit(tree))
    if patch.count != {"literals": 2, "start": 1, "iteration": 1}:
        fail(f"the authors' training_loop no longer has the structure this harness patches ({patch.count}): "
             f"git checkout {AUTHORS_COMMIT}")
    ns = dict(vars(stl), _G_START_NIMG=g_start, _GAN_START_NIMG=gan_start,
              _AUTHORS_START=on_start, _AUTHORS_ITERATION=on_iteration)
    exec(compile(tree, stl.__file__, "exec"), ns)
    return ns["training_loop"]


def loop_kwargs(rc: dict, run_dir: Path, teacher_pkl: Path, seed: int, total_nimg: int,
                use_gan: bool, lr_g: float, dataset_class: str, device: torch.device = torch.device("cpu")) -> dict:
    """Their loop's arguments for one of our runs, `rc` its resolved settings plus `teacher_kwargs`
    (the mapping table of docs/authors-code.md). Betas default to the config's (0, 0.999)."""
    net_kw = {k: v for k, v in rc["teacher_kwargs"].items() if k not in ("img_resolution", "img_channels", "label_dim")}
    net_kw.update(class_name="sida_training.sida_networks.EDMPrecond_EncoderDecoder", model_type="SongUNet_EncoderDecoder")
    if rc["dropout"] is not None:
        net_kw["dropout"] = rc["dropout"]
    adam = dict(class_name="torch.optim.Adam", eps=rc["adam_eps"] or 1e-8)
    beta2 = rc.get("beta2", 0.999)
    run_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        run_dir=str(run_dir), dataset_kwargs=dict(class_name=dataset_class), data_loader_kwargs={},
        network_kwargs=net_kw, loss_kwargs=dict(class_name="sida_training.sida_loss.SIDA_EDMLoss", P_mean=rc["P_mean"],
                                                P_std=rc["P_std"]),
        fake_score_optimizer_kwargs=dict(adam, lr=rc["lr_fake"], betas=[rc.get("beta1_fake", 0.0), beta2]),
        g_optimizer_kwargs=dict(adam, lr=lr_g, betas=[rc.get("beta1_g", 0.0), beta2]),
        augment_kwargs=None, seed=seed, batch_size=rc["batch"], batch_gpu=None, total_kimg=total_nimg / 1000,
        ema_halflife_kimg=rc["ema_halflife_kimg"], ema_rampup_ratio=rc["ema_rampup_ratio"], loss_scaling=1,
        loss_scaling_G=rc["lambda_sid"], kimg_per_tick=10 ** 6, snapshot_ticks=None, state_dump_ticks=None,
        resume_pkl=str(teacher_pkl), alpha=rc["alpha"], tmax=rc["tmax"], cudnn_benchmark=False,
        device=device, metrics=None, init_sigma=rc["sigma_init"], loss_scaling_G_gan=rc["lambda_adv"],
        loss_scaling_D=rc["lambda_d"], use_gan=use_gan, save_best_and_last=False)
