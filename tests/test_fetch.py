"""Stage `fetch`: local assets, sha256 checks, offline errors, resumable downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

try:  # tests/ is on sys.path when it has no __init__.py (pytest's default rootdir import mode)
    from test_edm_pickle import make_edm_pickle, tiny_net
except ImportError:  # pragma: no cover - tests/ made a package later
    from tests.test_edm_pickle import make_edm_pickle, tiny_net

from sida.io.checkpoints import load_network
from sida.errors import AssetError
from sida.eval.refstats import load_ref_stats
from stages.fetch import main

REPO = Path(__file__).resolve().parents[1]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _write_config(tmp_path: Path, assets: list[dict], data: dict | None = None) -> Path:
    cfg = {"experiment": "fetchtest", "fetch": {"cache_dir": str(tmp_path / "cache"), "assets": assets,
                                                "timeout_s": 10}}
    if data is not None:
        cfg["data"] = data
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(cfg: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "stages.fetch", "--config", str(cfg), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _outputs(net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 8]), 10).float()
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 3.0]), labels)


def _stats_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    f = np.random.default_rng(0).normal(size=(40, 12))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


def test_local_assets_manifest_and_teacher(tmp_path):
    net = tiny_net(seed=7)
    blob = make_edm_pickle(net)
    pkl = tmp_path / "edm-tiny.pkl"
    pkl.write_bytes(blob)
    mu, sigma = _stats_npz(tmp_path / "refs.npz")
    zpath = tmp_path / "ds.zip"
    import io
    import PIL.Image
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(3):
            buf = io.BytesIO()
            PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    inc = tmp_path / "weights.pt"
    inc.write_bytes(b"stand-in for the TorchScript Inception weights")
    cfg = _write_config(tmp_path, [
        {"name": "teacher", "kind": "teacher", "url": "https://example.invalid/edm.pkl", "path": str(pkl),
         "sha256": _sha(blob)},
        {"name": "refs", "kind": "refstats", "path": str(tmp_path / "refs.npz")},
        {"name": "data", "kind": "dataset", "path": str(zpath)},
        {"name": "inception", "kind": "inception", "path": str(inc)},
    ], data={"kind": "edm_zip", "resolution": 8, "channels": 3, "label_dim": 0})
    out = tmp_path / "out"
    main(["--config", str(cfg), "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    by_name = {a["name"]: a for a in manifest["assets"]}
    assert by_name["teacher"]["sha256"] == _sha(blob) and by_name["teacher"]["size"] == len(blob)
    assert by_name["teacher"]["source"] == str(pkl) and by_name["teacher"]["output"] == "teacher.pt"
    assert by_name["data"]["images"] == 3 and by_name["data"]["shape"] == [8, 8, 3]
    teacher = load_network(out / "teacher.pt")
    assert torch.equal(_outputs(teacher), _outputs(net))
    assert teacher.sida_meta["sha256"] == _sha(blob)
    m2, s2 = load_ref_stats(out / "refstats.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    assert (out / "inception-2015-12-05.pt").read_bytes() == inc.read_bytes()
    assert by_name["inception"]["sha256"] == _sha(inc.read_bytes())
    assert sorted(p.name for p in out.iterdir()) == ["inception-2015-12-05.pt", "manifest.json", "refstats.npz",
                                                     "teacher.pt"]


def test_sha_mismatch_one_line_error(tmp_path):
    pkl = tmp_path / "edm-tiny.pkl"
    pkl.write_bytes(make_edm_pickle(tiny_net()))
    cfg = _write_config(tmp_path, [{"name": "teacher", "kind": "teacher", "path": str(pkl), "sha256": "0" * 64}])
    out = tmp_path / "out"
    r = _run_cli(cfg, out)
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: asset 'teacher': sha256 mismatch"), r.stderr
    assert "expected " + "0" * 64 in lines[0]
    assert not (out / "teacher.pt").exists() and not (out / "manifest.json").exists()


def test_unreachable_url_one_line_error(tmp_path):
    url = "http://127.0.0.1:9/x.pkl"
    cfg = _write_config(tmp_path, [
        {"name": "teacher", "kind": "teacher", "url": url},
    ])
    out = tmp_path / "out"
    r = _run_cli(cfg, out)
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    cache = tmp_path / "cache" / "teacher.pkl"
    assert line.startswith(f"error: asset 'teacher' not available: {url} could not be reached (")
    assert line.endswith(f"); download it elsewhere and set fetch.assets[0].path: /path/to/file "
                         f"(or place it at {cache})")
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_missing_local_path_error(tmp_path):
    cfg = _write_config(tmp_path, [{"name": "refs", "kind": "refstats", "path": str(tmp_path / "nope.npz")}])
    with pytest.raises(AssetError, match=r"asset 'refs' not available: .*nope.npz does not exist; .*assets\[0\]"):
        main(["--config", str(cfg), "--out", str(tmp_path / "out")])


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.payload`, honours `Range: bytes=N-`, and can cut the first response short."""

    def do_GET(self):  # noqa: N802 (http.server API)
        srv = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = srv.payload[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(srv.payload) - 1}/{len(srv.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_next:  # simulate a dropped connection halfway through
            srv.cut_next = False
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.payload, srv.ranges, srv.cut_next = b"", [], False
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_resumable_download(tmp_path, server, capsys):
    net = tiny_net(seed=11)
    blob = make_edm_pickle(net)
    server.payload, server.cut_next = blob, True
    url = f"http://127.0.0.1:{server.server_address[1]}/edm-tiny.pkl"
    cfg = _write_config(tmp_path, [{"name": "teacher", "kind": "teacher", "url": url, "sha256": _sha(blob)}])
    out = tmp_path / "out"
    part = tmp_path / "cache" / "teacher.part"
    with pytest.raises(AssetError, match="rerun to resume"):
        main(["--config", str(cfg), "--out", str(out)])
    assert part.stat().st_size == len(blob) // 2 and not (out / "manifest.json").exists()
    main(["--config", str(cfg), "--out", str(out)])
    assert server.ranges == [None, f"bytes={len(blob) // 2}-"]
    assert not part.exists() and (tmp_path / "cache" / "teacher.pkl").read_bytes() == blob
    assert "resuming at" in capsys.readouterr().err
    assert torch.equal(_outputs(load_network(out / "teacher.pt")), _outputs(net))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["assets"][0]["source"] == url and manifest["assets"][0]["sha256"] == _sha(blob)
    # A third run is a verified cache hit: no request reaches the server.
    main(["--config", str(cfg), "--out", str(out)])
    assert len(server.ranges) == 2


def test_corrupt_download_is_deleted(tmp_path, server):
    server.payload = b"not the file you want"
    url = f"http://127.0.0.1:{server.server_address[1]}/edm.pkl"
    cfg = _write_config(tmp_path, [{"name": "teacher", "kind": "teacher", "url": url, "sha256": "a" * 64}])
    with pytest.raises(AssetError, match="sha256 mismatch"):
        main(["--config", str(cfg), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "cache" / "teacher.pkl").exists()


def test_dinov2_assets_per_arch_for_add_features_and_fd_dinov2(tmp_path):
    """ADD's ViT-S/14 and FD-DINOv2's ViT-L/14 side by side: each asset names its arch and is
    written as dinov2_<arch>.pth; two assets of one arch are refused before anything is read."""
    from sida.eval.features import save_random_dinov2
    from sida.io.assets import check_assets
    from stages.fetch import fetch

    small = save_random_dinov2(tmp_path / "s.pth", "vits14")
    assets = [{"name": "add_features", "kind": "dinov2", "arch": "vits14", "path": str(small)}]
    cfg = {"experiment": "fetchtest", "evaluate": {"dinov2_arch": "vitl14"},
           "fetch": {"cache_dir": str(tmp_path / "cache"), "assets": assets}}
    manifest = fetch(cfg, tmp_path / "out")
    assert manifest["assets"][0]["output"] == "dinov2_vits14.pth" and manifest["assets"][0]["arch"] == "vits14"
    assert (tmp_path / "out" / "dinov2_vits14.pth").is_file()
    with pytest.raises(Exception, match="per arch"):
        check_assets({"assets": assets + [dict(assets[0], name="again")]})
    with pytest.raises(Exception, match="kind dinov2 only"):
        check_assets({"assets": [{"name": "t", "kind": "teacher", "arch": "vits14", "path": "x"}]})
