"""The container recipes (definition, generated Dockerfile and conda env), the build command,
and provenance. No container engine is needed: recipes are checked with spython's parsers, the
build with a stand-in `apptainer` that records its arguments."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from containers import DEF_FILE, DOCKERFILE, ENVIRONMENT_YAML, REQUIREMENTS, ContainerError
from containers.build import MISSING_APPTAINER, build
from containers.sync import (build_arguments, def_sections, dockerfile_text, entrypoint_for, environment_yaml_text,
                             parse_definition, requirement_lines, sync)
from sida.run import provenance as prov
from sida.run.config import config_hash

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = "/opt/sida-pipeline"


@pytest.fixture(scope="module")
def recipe():
    return parse_definition(DEF_FILE)


def _pins() -> dict[str, str]:
    return {l.split("==")[0]: l.split("==")[1] for l in requirement_lines(REQUIREMENTS) if "==" in l}


# --- the definition --------------------------------------------------------------------------

def test_base_image_is_cuda_13_matching_the_pinned_torch(recipe):
    base = recipe.fromHeader
    assert base.startswith("nvidia/cuda:13."), base  # torch 2.14.1 from PyPI is a CUDA 13 build
    labels = dict(l.split(None, 1) for l in recipe.labels)
    assert labels["sida.torch"] == _pins()["torch"]
    assert base.split(":")[1].startswith(labels["sida.cuda"])
    import torch
    if torch.version.cuda:  # the local pinned wheel: same CUDA major as the image
        assert torch.version.cuda.split(".")[0] == labels["sida.cuda"].split(".")[0]


def test_files_copy_the_project(recipe):
    copied = dict(line.split() for line in recipe.files)
    for src in ("sida", "stages", "workflow", "config", "envs", "pyproject.toml", "profiles"):
        assert copied.get(src) == f"{PROJECT}/{src}", src


def test_post_installs_pinned_requirements_then_the_project(recipe):
    post = recipe.install
    req = [i for i, c in enumerate(post) if f"-r {PROJECT}/envs/requirements.txt" in c and "pip install" in c]
    proj = [i for i, c in enumerate(post) if c.rstrip().endswith(f"--no-deps -e {PROJECT}") and "pip install" in c]
    assert req and proj and req[0] < proj[0], post
    # Docker runs each %post line in its own shell: nothing may rely on an earlier line's cd/export.
    assert not any(c.startswith(("cd ", "export ")) or c.endswith("\\") for c in post)


def test_environment(recipe):
    env = dict(e.split("=", 1) for e in recipe.environ)
    assert env["PYTHONPATH"] == PROJECT
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["WANDB_MODE"] == "${WANDB_MODE:-offline}"  # offline unless the caller says otherwise
    assert env["SIDA_CONTAINER"] == "sida-pipeline"
    assert env["SIDA_GIT_COMMIT"] == "{{ SIDA_GIT_COMMIT }}"
    assert set(build_arguments(DEF_FILE)) == {"SIDA_GIT_COMMIT", "SIDA_GIT_DIRTY"}


def _runscript(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return subprocess.run(["/bin/sh", "-c", script, "sida-pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_runscript_runs_a_stage_or_a_command(recipe, tmp_path):
    assert len(def_sections(DEF_FILE)["runscript"]) == 1  # one line: spython maps it 1:1
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "hello.py").write_text("import sys; print('hello', sys.argv[1:])\n")
    out = _runscript(recipe.cmd, "hello", "--config", "a b.yaml", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "hello ['--config', 'a b.yaml']\n", out
    out = _runscript(recipe.cmd, "python", "-c", "print('direct')", cwd=tmp_path)
    assert out.stdout == "direct\n"
    out = _runscript(recipe.cmd, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("usage:")


# --- generated files -----------------------------------------------------------------------

def test_generated_files_are_in_sync():
    assert sync(check=True) == [], "run python -m containers.sync"
    out = subprocess.run([sys.executable, "-m", "containers.sync", "--check"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_dockerfile_matches_the_definition(recipe):
    from spython.main.parse.parsers import DockerParser

    docker = DockerParser(str(DOCKERFILE)).recipe["sida"]
    assert docker.fromHeader.strip() == recipe.fromHeader
    assert [list(f) for f in docker.files] == [f.split() for f in recipe.files]
    assert docker.environ == [e.replace("{{ ", "${").replace(" }}", "}") for e in recipe.environ]
    # spython's Docker parser files comments, ENV and ARG under install too; RUN commands are the rest.
    env_like = set(docker.environ) | {f"{k}={v}" for k, v in build_arguments(DEF_FILE).items()}
    assert [c for c in docker.install if c not in env_like and not c.startswith("#")] == recipe.install
    assert docker.entrypoint == entrypoint_for(recipe.cmd)
    text = DOCKERFILE.read_text()
    assert "{{" not in text and "ARG SIDA_GIT_COMMIT=unknown" in text
    assert "ENV SIDA_GIT_COMMIT=${SIDA_GIT_COMMIT}" in text


def test_check_detects_a_stale_dockerfile(tmp_path):
    changed = tmp_path / "sida.def"
    changed.write_text(DEF_FILE.read_text().replace("--no-cache-dir --upgrade pip", "--upgrade pip"))
    env = tmp_path / "environment.yaml"
    env.write_text(environment_yaml_text(REQUIREMENTS))
    assert sync(check=True, def_path=changed, environment=env) == [DOCKERFILE]
    assert DOCKERFILE.read_text() == dockerfile_text(DEF_FILE)  # --check wrote nothing


def test_environment_yaml_carries_exactly_the_pins():
    env = yaml.safe_load(ENVIRONMENT_YAML.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == requirement_lines(REQUIREMENTS)
    assert "pip" in env["dependencies"]


# --- build ---------------------------------------------------------------------------------

def test_build_without_apptainer_fails_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    out = subprocess.run([str(bin_dir / "python"), "-m", "containers.build"], cwd=REPO_ROOT,
                         env={"PATH": str(bin_dir), "PYTHONPATH": str(REPO_ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr == f"error: {MISSING_APPTAINER}\n"
    assert out.stderr.startswith("error: apptainer is not installed: install it (https://apptainer.org/")
    assert "docker build -f containers/Dockerfile ." in out.stderr


FAKE_APPTAINER = """#!/bin/sh
# Stand-in for apptainer: record the arguments; `build ... IMAGE RECIPE` writes IMAGE.
printf '%s\\n' "$@" > "$FAKE_LOG"
[ "$1" = build ] || exit 0
for last; do :; done
image=$(eval echo "\\${$(($#-1))}")
printf 'fake sif built from %s\\n' "$last" > "$image"
"""


def test_build_calls_apptainer_through_spython(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "args.txt"))
    recipe_file = tmp_path / "mini.def"
    recipe_file.write_text("Bootstrap: docker\nFrom: busybox:1\n%files\n    pyproject.toml /opt/x/pyproject.toml\n")
    out = tmp_path / "img" / "mini.sif"
    image = build(recipe_file, out, fakeroot=True)
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[0] == "build" and "--fakeroot" in args
    assert args[-2:] == [str(out), str(recipe_file)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert f"SIDA_GIT_COMMIT={commit}" in args and args[args.index(f"SIDA_GIT_COMMIT={commit}") - 1] == "--build-arg"
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert image == out and (out.parent / "mini.sif.sha256").read_text().split()[0] == digest
    assert prov.image_digest(out) == f"sha256:{digest}"  # provenance reads the sidecar
    with pytest.raises(ContainerError, match="--force"):
        build(recipe_file, out)


def test_build_reports_a_missing_files_source(tmp_path, monkeypatch):
    (tmp_path / "apptainer").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "apptainer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    recipe_file = tmp_path / "bad.def"
    recipe_file.write_text("Bootstrap: docker\nFrom: busybox:1\n%files\n    no-such-dir /opt/x\n")
    with pytest.raises(ContainerError, match="no-such-dir"):
        build(recipe_file, tmp_path / "x.sif")


# --- provenance ----------------------------------------------------------------------------

def test_write_provenance(tmp_path):
    cfg = {"experiment": "exp-p", "seed": 3, "distill": {"batch": 8}}
    rec = prov.write_provenance(tmp_path / "out", cfg)
    on_disk = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert on_disk == rec
    assert yaml.safe_load((tmp_path / "out" / "config.resolved.yaml").read_text()) == cfg
    assert rec["config_hash"] == config_hash(cfg)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert rec["code"]["commit"] == commit and rec["code"]["source"] == "git"
    assert isinstance(rec["code"]["dirty"], bool)
    if rec["code"]["dirty"]:  # the patch to rebuild the exact tree travels with the outputs
        assert (tmp_path / "out" / "git.diff").is_file() and "git apply" in rec["reproduce"]
    import torch
    assert rec["software"]["torch"] == torch.__version__
    assert rec["software"]["packages"]["torch"] == _pins()["torch"]
    assert rec["reproduce"].startswith(f"git checkout {commit}")
    assert rec["reproduce"].endswith(f"--config {tmp_path / 'out' / 'config.resolved.yaml'}")
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temp files


def test_reproduce_command_uses_the_resolved_config(monkeypatch):
    class Spec:
        name = "stages.distill"

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", Spec(), raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/stages/distill.py", "--config", "config/c.yaml", "--set", "seed=1",
                                      "--run", "sida", "--set=distill.batch=4"])
    for var in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    code = {"commit": "abc", "dirty": False}
    assert prov.reproduce_command(code, None, "r/c.yaml") == \
        "git checkout abc && python -m stages.distill --run sida --config r/c.yaml"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    container = {"image": "/c/sida.sif"}
    assert prov.reproduce_command(code, container, "r/c.yaml") == (
        "git checkout abc && apptainer exec --nv /c/sida.sif torchrun --standalone --nproc-per-node 4 "
        "-m stages.distill --run sida --config r/c.yaml")


def test_container_info_inside_apptainer(tmp_path):
    sif = tmp_path / "sida.sif"
    sif.write_bytes(b"not really a sif" * 1000)
    info = prov.container_info({"APPTAINER_CONTAINER": str(sif), "APPTAINER_NAME": "sida.sif",
                                "SIDA_CONTAINER": "sida-pipeline", "SIDA_GIT_COMMIT": "feed"})
    assert info["runtime"] == "apptainer" and info["image"] == str(sif) and info["sida_image"]
    assert info["digest"] == "sha256:" + hashlib.sha256(sif.read_bytes()).hexdigest()
    assert info["baked_commit"] == "feed"


def test_commit_baked_into_the_image_when_no_git(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDA_GIT_COMMIT", "0123abcd")
    monkeypatch.setenv("SIDA_GIT_DIRTY", "false")
    assert prov.git_info(tmp_path) == {"commit": "0123abcd", "dirty": False, "source": "image", "root": str(tmp_path)}
    monkeypatch.setenv("SIDA_GIT_COMMIT", "unknown")
    assert prov.git_info(tmp_path)["source"] == "unknown"


def test_git_files_fallback_without_git_binary(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("needs git to make the repository")
    repo = tmp_path / "r"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert prov.git_info(repo) == {"commit": head, "dirty": False, "source": "git", "root": str(repo)}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git binary
    assert prov.git_info(repo) == {"commit": head, "dirty": None, "source": "git-files", "root": str(repo)}
