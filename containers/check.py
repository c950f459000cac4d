"""The container test: a stage run inside the image gives bit for bit what it gives on the host.

    python -m containers.check [--base ...] [--host-pip ...] [--keep]     (make container-test)

1. builds the image unless the record (``build/sida-image.json``) names an image of this clean
   commit that is still there (a dirty tree is always rebuilt; unchanged layers come from cache);
2. runs the image with ``--help`` and checks that it lists the stages;
3. trains a tiny teacher of the embedded default on the host (the shared input);
4. runs the same short SiDA distillation (warm-up, SiD and adversarial phases, 8 iterations) on
   the host and inside the image, with the results folder bind-mounted and the thread count
   fixed on both sides, the image's unprivileged user writing the outputs;
5. fails unless every tensor of the two ``network.pt`` (and ``state.pt``) is equal, and the
   image run's ``provenance.json`` records the image's digest, name and baked commit.
Everything lives in ``results/container-test/`` (emptied at the start, kept afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import IMAGE_PROJECT_DIR, REPO_ROOT, ContainerError
from .build import git_build_args
from .engine import Engine, find_engine
from .entry import stages
from .image import build_image, default_tag, read_record

WORK = Path("results") / "container-test"  # relative to the repository root, and to the image's workdir
THREADS = 2
COMMON_SETS = ["wandb.mode=disabled", f"threads={THREADS}", "device=cpu", "evaluate.during_training.every_kimg=0"]
#: A teacher of the embedded default's architecture after 2 steps of 32 images: the shared input.
TEACHER_SETS = ["teacher.kimg=0.064", "teacher.batch=32", "teacher.tick_kimg=0.032", "teacher.snapshot_kimg=0.064"]
#: The embedded default's `sida` run made short: every kind of step (fake-score warm-up, SiD,
#: SiDA with the discriminator on real data), 2 + 2 + 4 iterations of 16 images.
RUN = "sida"
DISTILL_SETS = [f"distill.runs.{RUN}.init=teacher", "distill.batch=16", "distill.tick_kimg=0.032",
                "distill.snapshot_kimg=0.064",
                f"distill.runs.{RUN}.phases=[{{kind: warmup, kimg: 0.032}}, {{kind: sid, kimg: 0.032}}, "
                "{kind: sida, kimg: 0.064}]"]


def stage_args(sets: Sequence[str], *extra: str) -> list[str]:
    """``--config config/config.yaml --set ...`` plus `extra`, for a stage of the embedded default."""
    args = ["--config", "config/config.yaml"]
    for s in [*COMMON_SETS, *sets]:
        args += ["--set", s]
    return args + list(extra)


def _thread_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "WANDB_MODE": "disabled",
            "CUDA_VISIBLE_DEVICES": ""}


def run_host(python: str, module: str, args: Sequence[str]) -> None:
    env = {**os.environ, **_thread_env(), "PYTHONPATH": str(REPO_ROOT)}
    for var in ("SIDA_CONTAINER", "SIDA_IMAGE", "SIDA_IMAGE_DIGEST"):
        env.pop(var, None)
    out = subprocess.run([python, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise ContainerError(f"the host run of {module} failed (exit status {out.returncode}); its output is above")


def user_options(engine: Engine, work: Path) -> list[str]:
    """Who runs inside the image. As root: the image's own unprivileged user, with the mounted
    folder opened to it; otherwise the calling user (so the outputs stay theirs)."""
    if os.geteuid() == 0:
        work.chmod(0o777)
        return []
    if engine.name == "podman":
        return ["--userns=keep-id"]
    return ["--user", f"{os.getuid()}:{os.getgid()}"]


def run_image(engine: Engine, record: dict, work: Path, args: Sequence[str]) -> None:
    """`args` through the image's entry point, `work` mounted at the same relative place."""
    mount = f"{work.resolve()}:{IMAGE_PROJECT_DIR}/{WORK}"
    env = {**_thread_env(), "SIDA_IMAGE": record["image"], "SIDA_IMAGE_DIGEST": record["id"]}
    opts = ["run", "--rm", "-v", mount, *user_options(engine, work)]
    for key, value in env.items():
        opts += ["-e", f"{key}={value}"]
    # Run the image by its ID: the digest passed in is then, by construction, that of what runs.
    out = engine.call(*opts, record["id"].removeprefix("sha256:"), *args, timeout=3600)
    if out.returncode != 0:
        sys.stderr.write((out.stderr or "")[-4000:])
        raise ContainerError(f"the run inside {record['image']} failed (exit status {out.returncode}); "
                             "its output is above")


def tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a loaded checkpoint by its path (tensors and plain values)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def compare_files(a: Path, b: Path) -> int:
    """Number of tensors compared; ContainerError naming the first difference."""
    import torch

    la = tensors(torch.load(a, map_location="cpu", weights_only=True))
    lb = tensors(torch.load(b, map_location="cpu", weights_only=True))
    if la.keys() != lb.keys():
        diff = sorted(la.keys() ^ lb.keys())
        raise ContainerError(f"{a} and {b} hold different entries (first: {diff[0]})")
    count = 0
    for key, va in la.items():
        vb = lb[key]
        if isinstance(va, torch.Tensor):
            count += 1
            same = isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and va.shape == vb.shape and torch.equal(va, vb)
            if not same:
                delta = (va.double() - vb.double()).abs().max().item() if isinstance(vb, torch.Tensor) and \
                    va.shape == vb.shape else "shape/dtype"
                raise ContainerError(f"host and image differ in {a.name}: tensor {key} (max |diff| {delta}); "
                                     "the same torch build and thread count should give equal results")
        elif va != vb:
            raise ContainerError(f"host and image differ in {a.name}: {key} = {va!r} vs {vb!r}")
    return count


def check_provenance(path: Path, record: dict) -> dict:
    """The image run's provenance.json must name the image, its digest and the baked commit."""
    try:
        prov = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ContainerError(f"{path} is missing or unreadable ({exc}): the image run wrote no provenance")
    container = prov.get("container") or {}
    if container.get("digest") != record["id"]:
        raise ContainerError(f"{path} records image digest {container.get('digest')!r}, not {record['id']}")
    if container.get("image") != record["image"] or container.get("runtime") != record["engine"]:
        raise ContainerError(f"{path} records image {container.get('image')!r} under {container.get('runtime')!r}, "
                             f"not {record['image']} under {record['engine']}")
    if (prov.get("code") or {}).get("commit") != record["commit"]:
        raise ContainerError(f"{path} records commit {prov.get('code', {}).get('commit')!r}, not {record['commit']}")
    return prov


def ensure_image(engine: Engine, base: str | None, host_pip: str | None) -> dict:
    """The record of an image of this checkout: reused when clean and present, else built."""
    git = git_build_args()
    record = read_record()
    if record and git["SIDA_GIT_DIRTY"] == "false" and record.get("image") == default_tag(git) \
            and record.get("engine") == engine.name and engine.image_id(record["image"]) == record.get("id"):
        print(f"using {record['image']} ({record['id']}), built {record['built_utc']}", file=sys.stderr)
        return record
    return build_image(engine, base, host_pip)


def check_help(engine: Engine, record: dict) -> None:
    out = engine.call("run", "--rm", record["id"].removeprefix("sha256:"), "--help", timeout=300)
    missing = [s for s in stages() if s not in (out.stdout or "")]
    if out.returncode != 0 or missing:
        raise ContainerError(f"`{engine.name} run IMAGE --help` does not list the stages "
                             f"({'missing ' + ', '.join(missing) if missing else out.stderr.strip()[-200:]})")


def container_test(engine: Engine | None = None, base: str | None = None, host_pip: str | None = None,
                   python: str = sys.executable) -> dict:
    """Steps 1-5 of the module doc; returns a summary (also written to the work folder)."""
    start = time.monotonic()
    engine = engine or find_engine()
    record = ensure_image(engine, base, host_pip)
    engine.ensure_runs(record["id"].removeprefix("sha256:"))
    check_help(engine, record)
    work = REPO_ROOT / WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    run_host(python, "stages.teacher", stage_args(TEACHER_SETS, "--out", str(WORK / "teacher")))
    distill = lambda out: stage_args(DISTILL_SETS, "--run", RUN,  # noqa: E731
                                     "--teacher", str(WORK / "teacher" / "network.pt"), "--out", str(WORK / out))
    t1 = time.monotonic()
    run_host(python, "stages.distill", distill("host"))
    t2 = time.monotonic()
    run_image(engine, record, work, ["distill", *distill("image")])
    t3 = time.monotonic()
    n = compare_files(work / "host" / "network.pt", work / "image" / "network.pt")
    n_state = compare_files(work / "host" / "state.pt", work / "image" / "state.pt")
    check_provenance(work / "image" / "provenance.json", record)
    summary = {"image": record["image"], "id": record["id"], "network_tensors_equal": n, "state_tensors_equal": n_state,
               "seconds": {"teacher_host": round(t1 - t0, 1), "distill_host": round(t2 - t1, 1),
                           "distill_image": round(t3 - t2, 1), "total": round(time.monotonic() - start, 1)}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"container test passed: {n} tensors of network.pt and {n_state} of state.pt are bit-identical between "
          f"the host and {record['image']}; its provenance.json records {record['id']}", file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m containers.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=os.environ.get("CONTAINER_BASE") or "auto",
                        help="base image when a build is needed (see python -m containers.image)")
    parser.add_argument("--host-pip", default=None, help="1, 0 or auto (default: $SIDA_BUILD_HOST_PIP, else auto)")
    a = parser.parse_args(argv)
    container_test(base=a.base, host_pip=a.host_pip)


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
