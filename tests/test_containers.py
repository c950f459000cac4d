"""The container recipes (definition, generated Dockerfile, .dockerignore and conda env), the
image's entry point, the Apptainer build command, and provenance. No container engine is needed:
recipes are checked with spython's parser and a small Dockerfile reader, the Apptainer build with
a stand-in `apptainer` that records its arguments. (The podman/docker build: test_container_build.py;
the real image: `make container-test`.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from containers import DEF_FILE, DOCKERFILE, DOCKERIGNORE, ENVIRONMENT_YAML, IMAGE_PROJECT_DIR, REQUIREMENTS, ContainerError
from containers.build import MISSING_APPTAINER, build
from containers.entry import COMMANDS, stages, usage
from containers.sync import (build_arguments, def_header, def_sections, dockerfile_text, dockerignore_text,
                             entrypoint_for, environment_yaml_text, parse_definition, requirement_lines, sync)
from sida.run import provenance as prov
from sida.run.config import config_hash

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = IMAGE_PROJECT_DIR


@pytest.fixture(scope="module")
def recipe():
    return parse_definition(DEF_FILE)


def _pins() -> dict[str, str]:
    return {l.split("==")[0]: l.split("==")[1] for l in requirement_lines(REQUIREMENTS) if "==" in l}


# --- the definition --------------------------------------------------------------------------

def test_base_image_is_a_build_argument_defaulting_to_public_debian_python():
    assert def_header(DEF_FILE) == {"bootstrap": "docker", "from": "{{ BASE_IMAGE }}"}
    default = build_arguments(DEF_FILE)["BASE_IMAGE"]
    # Debian 12 + the Python the pins were checked with (3.11), fully qualified (no short-name lookup).
    assert default.startswith("docker.io/library/python:3.11-") and "bookworm" in default
    assert "cuda" not in default


def test_pinned_torch_brings_its_own_cuda_libraries(recipe):
    """Why no CUDA base image: the pinned torch wheel depends on the CUDA runtime as wheels."""
    labels = dict(l.split(None, 1) for l in recipe.labels)
    assert labels["sida.torch"] == _pins()["torch"]
    import torch
    if not torch.version.cuda:
        pytest.skip("the installed torch is a CPU build")
    assert labels["sida.cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
    requires = " ".join(metadata.requires("torch") or [])
    assert "nvidia-cudnn" in requires and ("cuda-toolkit" in requires or "nvidia-cuda-runtime" in requires), requires


def test_spython_reads_the_definition_as_written(recipe):
    """spython treats any line with its header keywords as a header line: none may have them."""
    raw = def_sections(DEF_FILE)
    assert recipe.install == raw["post"]
    assert recipe.files == raw["files"]
    assert recipe.environ == [l.removeprefix("export ") for l in raw["environment"]]
    assert [recipe.cmd] == raw["runscript"]


def test_files_copy_the_project_but_not_built_images(recipe):
    copied = dict(line.split() for line in recipe.files)
    for src in ("sida", "stages", "workflow", "config", "envs", "pyproject.toml", "profiles",
                "containers/__init__.py", "containers/entry.py"):
        assert copied.get(src) == f"{PROJECT}/{src}", src
    assert "containers" not in copied  # the folder may hold a built sida.sif


def test_post_installs_pinned_requirements_then_the_project(recipe):
    post = recipe.install
    req = [i for i, c in enumerate(post) if f"-r {PROJECT}/envs/requirements.txt" in c and "pip install" in c]
    proj = [i for i, c in enumerate(post) if c.rstrip().endswith(f"--no-deps -e {PROJECT}") and "pip install" in c]
    assert req and proj and req[0] < proj[0], post
    assert not any("--upgrade pip" in c for c in post)  # an unpinned pip would change the image over time
    # Docker runs each %post line in its own shell: nothing may rely on an earlier line's cd/export.
    assert not any(c.startswith(("cd ", "export ")) or c.endswith("\\") for c in post)
    # The last line uses every build argument (see test_build_arguments_come_after_the_heavy_layers).
    assert all(f"{{{{ {a} }}}}" in post[-1] for a in build_arguments(DEF_FILE))


def test_environment(recipe):
    env = dict(e.split("=", 1) for e in recipe.environ)
    assert env["PYTHONPATH"] == PROJECT
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["WANDB_MODE"] == "${WANDB_MODE:-offline}"  # offline unless the caller says otherwise
    assert env["SIDA_CONTAINER"] == "sida-pipeline"
    assert env["SIDA_GIT_COMMIT"] == "{{ SIDA_GIT_COMMIT }}"
    assert set(build_arguments(DEF_FILE)) == {"BASE_IMAGE", "SIDA_GIT_COMMIT", "SIDA_GIT_DIRTY"}


def _runscript(script: str, *args: str, cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": pythonpath}
    return subprocess.run(["/bin/sh", "-c", script, "sida-pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_runscript_lists_the_stages_on_help(recipe):
    for flag in ("--help", "-h"):
        out = _runscript(recipe.cmd, flag, cwd=REPO_ROOT, pythonpath=str(REPO_ROOT))
        assert out.returncode == 0 and out.stdout.startswith("usage:"), out
        for stage in ("teacher", "distill", "evaluate", "generate", "report", "fetch"):
            assert f"\n  {stage} " in out.stdout, stage
    assert _runscript(recipe.cmd, cwd=REPO_ROOT, pythonpath=str(REPO_ROOT)).stdout == usage() + "\n"


def test_runscript_runs_a_stage_or_a_command(recipe, tmp_path):
    # A stand-in project: its own stages/ and the real containers/ package.
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "hello.py").write_text('"""Stage `hello`: says hello."""\nimport sys; print("hello", sys.argv[1:])\n')
    (tmp_path / "containers").mkdir()
    for name in ("__init__.py", "entry.py"):
        shutil.copy(REPO_ROOT / "containers" / name, tmp_path / "containers" / name)
    path = f"{tmp_path}:{REPO_ROOT}"
    out = _runscript(recipe.cmd, "hello", "--config", "a b.yaml", cwd=tmp_path, pythonpath=path)
    assert out.returncode == 0 and out.stdout == "hello ['--config', 'a b.yaml']\n", out
    assert stages(tmp_path / "stages") == {"hello": "says hello."}
    out = _runscript(recipe.cmd, "python", "-c", "print('direct')", cwd=tmp_path, pythonpath=path)
    assert out.stdout == "direct\n"
    out = _runscript(recipe.cmd, "nope", cwd=tmp_path, pythonpath=path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("error: 'nope' is neither a stage (hello) nor a command "
                          f"({', '.join(COMMANDS)}): run the image with --help\n")


# --- generated files -----------------------------------------------------------------------

def test_generated_files_are_in_sync():
    assert sync(check=True) == [], "run python -m containers.sync"
    out = subprocess.run([sys.executable, "-m", "containers.sync", "--check"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def read_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _docker(text: str) -> str:
    return text.replace("{{ ", "${").replace(" }}", "}")


def test_dockerfile_matches_the_definition(recipe):
    ins = read_dockerfile(DOCKERFILE)
    kinds = [k for k, _ in ins]
    args = build_arguments(DEF_FILE)
    assert ins[0] == ("ARG", f"BASE_IMAGE={args['BASE_IMAGE']}") and ins[1] == ("FROM", "${BASE_IMAGE} AS sida")
    assert kinds.count("FROM") == 1
    assert [r for k, r in ins if k == "RUN"] == [_docker(c) for c in recipe.install]
    assert sorted(tuple(r.split()) for k, r in ins if k == "COPY") == sorted(tuple(f.split()) for f in recipe.files)
    env = [r for k, r in ins if k == "ENV"]
    assert len(env) == 1 and env[0].split() == [_docker(e) for e in recipe.environ]
    labels = [r for k, r in ins if k == "LABEL"]
    assert len(labels) == 1
    for label in recipe.labels:
        key, value = label.split(None, 1)
        assert f'{key}={json.dumps(_docker(value))}' in labels[0]
    assert ("USER", "sida") in ins and ("WORKDIR", PROJECT) in ins
    assert json.loads(dict(ins)["ENTRYPOINT"]) == entrypoint_for(recipe.cmd)
    assert "{{" not in DOCKERFILE.read_text()


def test_sources_are_copied_after_the_requirements_layer():
    """A code change must not redo the ~5 GB `pip install -r` layer: only envs/ comes before it."""
    ins = read_dockerfile(DOCKERFILE)
    req = next(i for i, (k, r) in enumerate(ins) if k == "RUN" and "-r /opt/sida-pipeline/envs/requirements.txt" in r)
    before = [r.split()[0] for k, r in ins[:req] if k == "COPY"]
    assert before == ["envs"]
    editable = next(i for i, (k, r) in enumerate(ins) if k == "RUN" and r.endswith(f"-e {PROJECT}"))
    assert all(i < editable for i, (k, _) in enumerate(ins) if k == "COPY")  # the project is whole before -e


def test_build_arguments_come_after_the_heavy_layers():
    """A new commit rebuilds only the last tiny layers; and it does rebuild them: the first use of
    SIDA_GIT_COMMIT is a RUN (buildah's cache ignores changed arguments in ENV/LABEL steps)."""
    ins = read_dockerfile(DOCKERFILE)
    first_arg = next(i for i, (k, r) in enumerate(ins) if k == "ARG" and r.startswith("SIDA_GIT_COMMIT"))
    assert all(k != "RUN" or "pip install" not in r for k, r in ins[first_arg:])
    first_use = next(i for i, (k, r) in enumerate(ins) if i > first_arg and "${SIDA_GIT_COMMIT}" in r)
    assert ins[first_use][0] == "RUN"


def test_dockerignore_admits_only_the_copied_files(recipe):
    lines = [l for l in DOCKERIGNORE.read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    assert [l[1:] for l in lines if l.startswith("!")] == [f.split()[0] for f in recipe.files]
    assert DOCKERIGNORE.read_text() == dockerignore_text(DEF_FILE)


def test_an_undefined_build_argument_is_one_error(tmp_path):
    bad = tmp_path / "bad.def"
    bad.write_text(DEF_FILE.read_text().replace("{{ SIDA_GIT_DIRTY }}", "{{ NOT_DEFINED }}", 1))
    with pytest.raises(ContainerError, match=r"uses \{\{ NOT_DEFINED \}\} but its %arguments do not define it"):
        dockerfile_text(bad)


def test_check_detects_a_stale_dockerfile(tmp_path):
    changed = tmp_path / "sida.def"
    changed.write_text(DEF_FILE.read_text().replace("--no-cache-dir -r", "-r"))
    env = tmp_path / "environment.yaml"
    env.write_text(environment_yaml_text(REQUIREMENTS))
    ignore = tmp_path / "dockerignore"
    ignore.write_text(dockerignore_text(changed))
    assert sync(check=True, def_path=changed, environment=env, dockerignore=ignore) == [DOCKERFILE]
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
    assert "make container" in out.stderr and "docker-archive://" in out.stderr


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


def test_container_info_inside_podman(tmp_path):
    """An unprivileged podman container gets an empty /run/.containerenv: the image name and ID
    come from whoever started it (SIDA_IMAGE, SIDA_IMAGE_DIGEST)."""
    cenv = tmp_path / ".containerenv"
    cenv.write_text("")
    env = {"container": "podman", "SIDA_CONTAINER": "sida-pipeline", "SIDA_IMAGE": "localhost/sida-pipeline:abc",
           "SIDA_IMAGE_DIGEST": "sha256:" + "1" * 64, "SIDA_GIT_COMMIT": "abc"}
    info = prov.container_info(env, containerenv=cenv)
    assert info == {"runtime": "podman", "image": "localhost/sida-pipeline:abc", "name": "sida-pipeline",
                    "digest": "sha256:" + "1" * 64, "sida_image": True, "baked_commit": "abc"}
    # A privileged container's containerenv names the image itself.
    cenv.write_text('engine="podman-4.3.1"\nname="x"\nimage="localhost/sida-pipeline:abc"\nimageid="' + "2" * 64 + '"\n')
    info = prov.container_info({"container": "podman"}, containerenv=cenv)
    assert info["image"] == "localhost/sida-pipeline:abc" and info["digest"] == "sha256:" + "2" * 64
    assert prov.container_info({}, containerenv=tmp_path / "absent") is None or Path("/.dockerenv").exists()


def test_reproduce_command_inside_podman_uses_the_image(monkeypatch):
    class Spec:
        name = "stages.distill"

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", Spec(), raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/stages/distill.py", "--config", "config/config.yaml", "--run", "sid"])
    for var in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    code = {"commit": "abc", "dirty": False, "source": "image"}  # the image's code: no checkout step
    line = prov.reproduce_command(code, {"runtime": "podman", "image": "localhost/sida-pipeline:abc"}, "results/r.yaml")
    assert line == ('podman run --rm -v "$PWD/results":/opt/sida-pipeline/results localhost/sida-pipeline:abc '
                    "python -m stages.distill --run sid --config results/r.yaml")
