"""Building the image with podman/docker (containers.image, .engine, .base, .hostpip) and the
container test's checks (containers.check), without a container engine: a stand-in `podman`
records what it is asked and answers from a small JSON state. The real build and the host vs
image comparison run in `make container-test` (CI)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from containers import ContainerError
from containers import base as base_mod
from containers import hostpip
from containers.build import git_build_args
from containers.check import (DISTILL_SETS, RUN, TEACHER_SETS, check_provenance, compare_files, stage_args)
from containers.engine import MISSING_ENGINE, RUNC_CONF, Engine, find_engine
from containers.image import build_image, default_tag, diagnose, resolve_base, verify_archive

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_ENGINE = r'''#!PYTHON
"""Stand-in container engine: state in $FAKE_STATE (images, behaviour), calls appended to $FAKE_LOG."""
import json, os, sys
state_path = os.environ["FAKE_STATE"]
state = json.load(open(state_path))
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "conf": os.environ.get("CONTAINERS_CONF")}) + "\n")
def save():
    json.dump(state, open(state_path, "w"))
cmd = args[0]
if cmd == "info":
    sys.exit(state.get("info_rc", 0))
if cmd == "image" and args[1] == "inspect":
    fmt, ref = args[3], args[4]
    img = state["images"].get(ref)
    if img is None:
        print(f"Error: {ref}: image not known", file=sys.stderr); sys.exit(125)
    if ".Id" in fmt: print(img["id"])
    elif ".Env" in fmt: print("\n".join(img.get("env", [])))
    elif ".Digest" in fmt: print("sha256:" + "d" * 64)
    sys.exit(0)
if cmd == "pull":
    print("Error: initializing source: pinging container registry: no such host", file=sys.stderr); sys.exit(125)
if cmd == "run":
    if state.get("limits_fail") and not os.environ.get("CONTAINERS_CONF"):
        print("Error: crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied", file=sys.stderr)
        sys.exit(126)
    sys.exit(state.get("probe_rc", 0) if "/bin/sh" in args else 0)
if cmd == "build":
    print("STEP 1/3: FROM ${BASE_IMAGE} AS sida")
    print(state.get("build_output", ""))
    if state.get("build_rc", 0):
        sys.exit(state["build_rc"])
    tag = args[args.index("-t") + 1]
    bargs = dict(a.split("=", 1) for i, a in enumerate(args) if i and args[i - 1] == "--build-arg")
    commit = state.get("baked_commit") or bargs["SIDA_GIT_COMMIT"]
    state["images"][tag] = {"id": "sha256:" + "a" * 64, "env": [f"SIDA_GIT_COMMIT={commit}", "PATH=/opt/venv/bin"]}
    save()
    sys.exit(0)
sys.exit(0)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A stand-in `podman` (and `docker`) first on PATH; returns (state dict setter, log reader)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("podman", "docker"):
        (bin_dir / name).write_text(FAKE_ENGINE.replace("PYTHON", sys.executable))
        (bin_dir / name).chmod(0o755)
    state_file, log_file = tmp_path / "state.json", tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_STATE", str(state_file))
    monkeypatch.setenv("FAKE_LOG", str(log_file))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    monkeypatch.delenv("SIDA_ENGINE", raising=False)
    monkeypatch.setenv("SIDA_BUILD_HOST_PIP", "0")

    class Fake:
        bin = bin_dir

        def state(self, **kw):
            st = {"images": {"example/base:1": {"id": "sha256:" + "b" * 64}}}
            st.update(kw)
            state_file.write_text(json.dumps(st))

        def calls(self):
            return [json.loads(l) for l in log_file.read_text().splitlines()] if log_file.exists() else []

        def engine(self):
            return Engine("podman", str(bin_dir / "podman"))

    f = Fake()
    f.state()
    return f


def _cli(module: str, *args: str, path: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {"PATH": path, "PYTHONPATH": str(REPO_ROOT), "HOME": os.environ.get("HOME", "/root"),
         "SIDA_BUILD_HOST_PIP": "0", **{k: v for k, v in os.environ.items() if k.startswith("FAKE_")}, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=e, capture_output=True,
                          text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if "error" in l.lower()]


# --- the engine ----------------------------------------------------------------------------------

def test_missing_engine_is_one_line(tmp_path):
    (tmp_path / "python").symlink_to(sys.executable)
    out = _cli("containers.image", path=str(tmp_path))
    assert out.returncode == 1 and out.stderr == f"error: {MISSING_ENGINE}\n"
    assert "apt-get install podman runc" in out.stderr


def test_docker_whose_daemon_is_down_is_named(fake, tmp_path, monkeypatch):
    (fake.bin / "podman").unlink()
    fake.state(info_rc=1)
    monkeypatch.setenv("PATH", str(fake.bin))
    with pytest.raises(ContainerError, match=r"docker is installed but its daemon does not answer.*systemctl start docker"):
        find_engine()
    fake.state(info_rc=0)
    assert find_engine().name == "docker"


def test_probe_switches_podman_to_runc_when_limits_fail(fake, capsys):
    fake.state(limits_fail=True)
    engine = fake.engine()
    engine.ensure_runs("example/base:1")
    assert engine.env == {"CONTAINERS_CONF": str(RUNC_CONF)}
    assert "using containers/podman-runc.conf" in capsys.readouterr().err
    engine.call("run", "--rm", "example/base:1", "true")
    assert fake.calls()[-1]["conf"] == str(RUNC_CONF)  # every later command uses it
    conf = RUNC_CONF.read_text()
    assert 'runtime = "runc"' in conf and '"nofile=20000:20000"' in conf and '"nproc=4096:4096"' in conf


def test_a_normal_podman_keeps_its_settings(fake):
    engine = fake.engine()
    engine.ensure_runs("example/base:1")
    assert engine.env == {} and len(fake.calls()) == 1


# --- building --------------------------------------------------------------------------------

def test_build_tags_with_the_commit_and_records_the_digest(fake, tmp_path):
    git = git_build_args()
    record = build_image(fake.engine(), base="example/base:1", host_pip="0", record_path=tmp_path / "rec.json")
    build = next(c["args"] for c in fake.calls() if c["args"][0] == "build")
    tag = default_tag(git)
    assert tag == f"localhost/sida-pipeline:{git['SIDA_GIT_COMMIT'][:12]}" + ("-dirty" if git["SIDA_GIT_DIRTY"] == "true" else "")
    assert build[build.index("-t") + 1] == tag and build[build.index("-f") + 1].endswith("containers/Dockerfile")
    assert "--build-arg" in build and "BASE_IMAGE=example/base:1" in build
    assert f"SIDA_GIT_COMMIT={git['SIDA_GIT_COMMIT']}" in build and build[-1] == str(REPO_ROOT)
    assert not any(a == "-v" for a in build)  # host pip off: nothing mounted
    on_disk = json.loads((tmp_path / "rec.json").read_text())
    assert on_disk == record
    assert record["image"] == tag and record["id"] == "sha256:" + "a" * 64 and record["base_image"] == "example/base:1"
    assert record["commit"] == git["SIDA_GIT_COMMIT"] and record["engine"] == "podman" and record["host_pip"] is False


def test_build_with_host_pip_mounts_settings_and_named_folders(fake, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    (tmp_path / "idx" / "simple").mkdir(parents=True)
    wheels.mkdir()
    cert = tmp_path / "ca.crt"
    cert.write_text("CERT")
    settings = {"global": {"cert": str(cert), "find-links": str(wheels),
                           "extra-index-url": f"file://{tmp_path}/idx/simple https://mirror.example/simple"}}
    monkeypatch.setattr(hostpip, "host_pip_settings", lambda python=sys.executable: settings)
    build_image(fake.engine(), base="example/base:1", host_pip="1", record_path=tmp_path / "rec.json")
    build = next(c["args"] for c in fake.calls() if c["args"][0] == "build")
    mounts = [build[i + 1] for i, a in enumerate(build) if a == "-v"]
    assert mounts[0].endswith(":/etc/pip.conf:ro")
    assert sorted(mounts[1:]) == sorted(f"{p}:{p}:ro" for p in (cert, wheels, tmp_path / "idx"))
    assert json.loads((tmp_path / "rec.json").read_text())["host_pip"] is True


def test_host_pip_with_docker_is_refused(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(hostpip, "host_pip_settings", lambda python=sys.executable: {"global": {"cert": "/x"}})
    docker = Engine("docker", str(fake.bin / "docker"))
    with pytest.raises(ContainerError, match="SIDA_BUILD_HOST_PIP needs podman"):
        build_image(docker, base="example/base:1", host_pip="1", record_path=tmp_path / "rec.json")


def test_a_stale_cached_commit_is_refused(fake, tmp_path):
    fake.state(baked_commit="0" * 40)
    with pytest.raises(ContainerError, match="stale build cache.*--no-cache"):
        build_image(fake.engine(), base="example/base:1", host_pip="0", record_path=tmp_path / "rec.json")


def test_a_failed_build_is_one_line_naming_cause_and_fix(fake):
    fake.state(build_rc=1, build_output="pip._vendor.urllib3.exceptions.SSLError: [SSL: CERTIFICATE_VERIFY_FAILED]")
    out = _cli("containers.image", "--base", "example/base:1", "--archive", "none", path=f"{fake.bin}:/usr/bin:/bin")
    assert out.returncode == 1, out
    assert "CERTIFICATE_VERIFY_FAILED" in out.stdout  # the build's own output is shown
    assert _error_lines(out.stderr) == [
        "error: podman build failed: pip could not verify PyPI's certificate (a TLS-intercepting proxy?): build "
        "with SIDA_BUILD_HOST_PIP=1 so the build uses the host's CA bundle and pip settings"]


def test_a_certificate_failure_with_host_pip_points_at_the_hosts_settings():
    msg = diagnose(Engine("podman", "podman"), 1, ["SSLError CERTIFICATE_VERIFY_FAILED"], host_pip=True)
    assert msg == ("podman build failed: pip could not verify PyPI's certificate (a TLS-intercepting proxy?) even "
                   "with the host's pip settings: check the CA bundle and indexes `pip config list` names on the host")


def test_an_unknown_build_failure_names_the_step():
    tail = ["STEP 3/26: RUN python3 -m venv /opt/venv", "boom", "Error: building at STEP ..."]
    assert diagnose(Engine("podman", "podman"), 2, tail) == \
        "podman build failed (exit status 2) at STEP 3/26: RUN python3 -m venv /opt/venv: its output is above"


def test_a_bad_base_image_is_one_line(fake):
    out = _cli("containers.image", "--base", "registry.example/nope:1", "--archive", "none",
               path=f"{fake.bin}:/usr/bin:/bin")
    assert out.returncode == 1
    assert out.stderr.startswith("error: base image registry.example/nope:1 is not available: not found locally and "
                                 "the pull failed (Error: initializing source: pinging container registry: no such host)")
    assert "CONTAINER_BASE=local" in out.stderr and len(out.stderr.splitlines()) == 1


def test_a_base_without_apt_or_python_is_refused(fake, tmp_path):
    fake.state(probe_rc=1)
    with pytest.raises(ContainerError, match="base image example/base:1 has neither apt-get nor python3 and git"):
        build_image(fake.engine(), base="example/base:1", host_pip="0", record_path=tmp_path / "rec.json")


def test_auto_base_falls_back_to_the_local_debian_base(fake, monkeypatch, capsys):
    made = []
    monkeypatch.setattr("containers.image.make_base", lambda engine: made.append(1) or "localhost/sida-base:bookworm")
    assert resolve_base(fake.engine(), "auto") == "localhost/sida-base:bookworm" and made
    assert "cannot be pulled" in capsys.readouterr().err
    fake.state(images={"docker.io/library/python:3.11-slim-bookworm": {"id": "sha256:" + "c" * 64}})
    assert resolve_base(fake.engine(), "auto") == "docker.io/library/python:3.11-slim-bookworm"  # present: used


# --- the local Debian base -------------------------------------------------------------------

def test_apt_mirror_from_the_hosts_sources(tmp_path):
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    assert base_mod.apt_mirror(d) == base_mod.DEFAULT_MIRROR
    (d / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    assert base_mod.apt_mirror(d) == "http://mirror.example/debian"
    (d / "sources.list.d" / "debian.sources").unlink()
    (d / "sources.list").write_text("deb [arch=amd64] http://ftp.example/debian bookworm main\n")
    assert base_mod.apt_mirror(d) == "http://ftp.example/debian"
    cmd = base_mod.debootstrap_command(tmp_path / "root", "http://m/debian")
    assert cmd[:3] == ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,git,ca-certificates"]
    assert cmd[3:] == ["bookworm", str(tmp_path / "root"), "http://m/debian"]


def test_local_base_needs_debootstrap_and_root(fake, monkeypatch):
    monkeypatch.setattr(base_mod.shutil, "which", lambda name: None)
    with pytest.raises(ContainerError, match="debootstrap is not installed: apt-get install debootstrap"):
        base_mod.make_base(fake.engine(), "localhost/x:1")
    monkeypatch.setattr(base_mod.shutil, "which", lambda name: "/usr/sbin/debootstrap")
    monkeypatch.setattr(base_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(ContainerError, match="debootstrap needs root"):
        base_mod.make_base(fake.engine(), "localhost/x:1")
    assert base_mod.make_base(fake.engine(), "example/base:1") == "example/base:1"  # exists: reused


# --- host pip settings ---------------------------------------------------------------------------

def test_host_pip_settings_merge_files_and_environment(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\ncat <<'EOF'\nglobal.cert='/etc/ssl/a.crt'\nglobal.find-links='/opt/w'\n"
                           "install.no-compile='1'\n:env:.find-links='/opt/other'\n:env:.default-timeout='180'\nEOF\n")
    fake_python.chmod(0o755)
    settings = hostpip.host_pip_settings(str(fake_python))
    assert settings == {"global": {"cert": "/etc/ssl/a.crt", "find-links": "/opt/other", "default-timeout": "180"},
                        "install": {"no-compile": "1"}}  # PIP_* variables win, as in pip
    import configparser
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(hostpip.pip_conf_text(settings))
    assert {s: dict(parsed[s]) for s in parsed.sections()} == settings


def test_named_paths(tmp_path):
    (tmp_path / "pypi" / "simple").mkdir(parents=True)
    (tmp_path / "pypi" / "files").mkdir()
    (tmp_path / "w").mkdir()
    settings = {"global": {"extra-index-url": f"file://{tmp_path}/pypi/simple https://pypi.example/simple",
                           "find-links": f"{tmp_path}/w {tmp_path}/w/sub-missing {tmp_path}/pypi/files",
                           "constraint": str(tmp_path / "missing.txt"), "timeout": "/not/a/path/option"}}
    assert hostpip.named_paths(settings) == [tmp_path / "pypi", tmp_path / "w"]


@pytest.mark.parametrize("value,expected", [("1", True), ("yes", True), ("0", False), ("off", False), ("auto", None),
                                            ("", None)])
def test_host_pip_switch(value, expected):
    assert hostpip.wanted(value) is expected


def test_host_pip_switch_rejects_nonsense():
    with pytest.raises(ContainerError, match="SIDA_BUILD_HOST_PIP='maybe' is not understood"):
        hostpip.wanted("maybe")


# --- archives -----------------------------------------------------------------------------------

def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_verify_archive_docker_and_oci(tmp_path):
    config = b'{"architecture": "amd64"}'
    digest = hashlib.sha256(config).hexdigest()
    record = {"id": f"sha256:{digest}", "image": "localhost/sida-pipeline:x"}
    docker = tmp_path / "d.tar"
    _tar(docker, {f"{digest}.json": config, "manifest.json": json.dumps([{"Config": f"{digest}.json"}]).encode()})
    verify_archive(docker, record)
    manifest = json.dumps({"config": {"digest": f"sha256:{digest}"}}).encode()
    mdigest = hashlib.sha256(manifest).hexdigest()
    oci = tmp_path / "o.tar"
    _tar(oci, {f"blobs/sha256/{digest}": config, f"blobs/sha256/{mdigest}": manifest,
               "index.json": json.dumps({"manifests": [{"digest": f"sha256:{mdigest}"}]}).encode()})
    verify_archive(oci, {**record, "archive_format": "oci-archive"})
    with pytest.raises(ContainerError, match="holds another image"):
        verify_archive(docker, {**record, "id": "sha256:" + "0" * 64})
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(ContainerError, match="not a readable image archive"):
        verify_archive(tmp_path / "junk.tar", record)


# --- the container test's checks -------------------------------------------------------------------

def test_the_short_run_is_the_embedded_default_with_every_step_kind():
    from sida.run.config import load_config, run_config

    def sets(args):
        return [args[i + 1] for i, a in enumerate(args) if a == "--set"]

    args = stage_args(DISTILL_SETS)
    assert args[:2] == ["--config", "config/config.yaml"]
    cfg = load_config(REPO_ROOT / "config" / "config.yaml", sets(args))
    rc = run_config(cfg, RUN)
    assert [p["kind"] for p in rc["phases"]] == ["warmup", "sid", "sida"] and rc["init"] == "teacher"
    assert rc["discriminator"] and rc["batch"] == 16 and cfg["threads"] == 2 and cfg["device"] == "cpu"
    assert sum(p["kimg"] for p in rc["phases"]) * 1000 / rc["batch"] == 8  # iterations
    teacher = load_config(REPO_ROOT / "config" / "config.yaml", sets(stage_args(TEACHER_SETS)))["teacher"]
    assert teacher["kimg"] * 1000 / teacher["batch"] == 2


def _net_file(path: Path, bump: str | None = None) -> Path:
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(3, 3), "b.bias": torch.randn(3)}
    if bump:
        sd[bump] = sd[bump].clone()
        sd[bump].view(-1)[0] = torch.nextafter(sd[bump].view(-1)[0], torch.tensor(1e9))  # one ulp
    torch.save({"format": "sida-network", "state_dict": sd, "meta": {"kimg": 0.128}}, path)
    return path


def test_compare_files_demands_bit_identity(tmp_path):
    a = _net_file(tmp_path / "a.pt")
    assert compare_files(a, _net_file(tmp_path / "b.pt")) == 2
    with pytest.raises(ContainerError, match=r"differ in a.pt: tensor state_dict.b.bias \(max \|diff\| [0-9.e-]+\)"):
        compare_files(a, _net_file(tmp_path / "c.pt", bump="b.bias"))
    torch.save({"format": "sida-network", "state_dict": {"a.weight": torch.zeros(3, 3)}, "meta": {}}, tmp_path / "d.pt")
    with pytest.raises(ContainerError, match="hold different entries"):
        compare_files(a, tmp_path / "d.pt")


def test_check_provenance(tmp_path):
    record = {"id": "sha256:" + "a" * 64, "image": "localhost/sida-pipeline:abc", "engine": "podman", "commit": "abc"}
    good = {"container": {"digest": record["id"], "image": record["image"], "runtime": "podman"},
            "code": {"commit": "abc", "source": "image"}}
    (tmp_path / "p.json").write_text(json.dumps(good))
    assert check_provenance(tmp_path / "p.json", record) == good
    (tmp_path / "p.json").write_text(json.dumps({**good, "container": {**good["container"], "digest": None}}))
    with pytest.raises(ContainerError, match="records image digest None"):
        check_provenance(tmp_path / "p.json", record)
    with pytest.raises(ContainerError, match="missing or unreadable"):
        check_provenance(tmp_path / "absent.json", record)
