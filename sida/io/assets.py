"""The assets of the fetch stage (`fetch.assets`): validated, resolved to a local file or folder,
verified.

- `check_assets`: the config's entries (``{name, kind, url, path, sha256}``) checked and normalized.
- `resolve_asset`: ``path`` (a local file or folder) wins over ``url``; else a cached copy in
  ``fetch.cache_dir`` (checked against sha256 when given); else a download with urllib, resumed
  from ``<cache_dir>/<name>.part`` via an HTTP Range request when a previous one was interrupted
  (`download`). A VAE folder is downloaded file by file.
- `verify_asset`: the sha256 the config gives, for files and a folder's listed files.

What each kind becomes (the conversion) is the stage's job: `stages.fetch`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import AssetError, ConfigError

__all__ = ["ASSET_KINDS", "log", "sha256_file", "check_assets", "download", "resolve_asset", "verify_asset"]

# captions, clip and images serve the zero-shot text-to-image evaluation (sida.eval.coco, .clip_score).
ASSET_KINDS = ("teacher", "dataset", "refstats", "inception", "sid_generator", "vae", "dinov2", "captions", "clip",
               "images")
CHUNK = 1 << 20
PROGRESS_EVERY_S = 2.0


def log(msg: str) -> None:
    """A progress line of the fetch stage on stderr."""
    print(f"fetch: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (teachers are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_assets(fetch_cfg: dict) -> list[dict]:
    """Validate `fetch.assets` (names, kinds, url/path, sha256 format); return normalized copies."""
    unknown = set(fetch_cfg) - {"cache_dir", "timeout_s", "assets"}
    if unknown:
        raise ConfigError(f"fetch: unknown key(s) {', '.join(sorted(unknown))} (known: cache_dir, timeout_s, assets)")
    assets = fetch_cfg.get("assets") or []
    if not isinstance(assets, list):
        raise ConfigError("fetch.assets must be a list of {name, kind, url, path, sha256}")
    out, names = [], set()
    for i, a in enumerate(assets):
        where = f"fetch.assets[{i}]"
        if not isinstance(a, dict):
            raise ConfigError(f"{where} must be a mapping with name, kind and url or path")
        unknown = set(a) - {"name", "kind", "url", "path", "sha256", "files", "arch"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if a.get("arch") is not None and a.get("kind") != "dinov2":
            raise ConfigError(f"{where}.arch applies to kind dinov2 only")
        name, kind = a.get("name"), a.get("kind")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{where}.name must be a simple name (letters, digits, _.-), not {name!r}")
        if name in names:
            raise ConfigError(f"{where}.name: asset '{name}' is listed twice")
        names.add(name)
        if kind not in ASSET_KINDS:
            raise ConfigError(f"{where}.kind must be one of {', '.join(ASSET_KINDS)}, not {kind!r}")
        if not a.get("url") and not a.get("path"):
            raise ConfigError(f"{where} ('{name}') needs a url or a path")
        if kind == "sid_generator" and name == "teacher":  # its output would overwrite teacher.pt
            raise ConfigError(f"{where}.name: a sid_generator cannot be called 'teacher'")
        if kind in ("captions", "clip") and name == "manifest":  # its output <name><suffix> could be manifest.json
            raise ConfigError(f"{where}.name: a {kind} asset cannot be called 'manifest'")
        sha = a.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
            raise ConfigError(f"{where}.sha256 must be 64 hex digits")
        files = a.get("files")
        if files is not None and (kind != "vae" or not isinstance(files, dict) or not files or any(
                not re.fullmatch(r"[A-Za-z0-9_.-]+", str(f)) or (h is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(h)))
                for f, h in files.items())):
            raise ConfigError(f"{where}.files applies to kind vae only: a mapping of plain file names to sha256 (or null)")
        if kind == "vae" and a.get("url") and not a.get("path") and not files:
            raise ConfigError(f"{where} ('{name}'): a vae url is a folder's base url: list its files under files")
        out.append(dict(a, sha256=sha.lower() if sha else None, index=i,
                        files={f: (h.lower() if h else None) for f, h in (files or {}).items()}))
    for kind in ("teacher", "refstats", "dataset", "vae"):
        if sum(a["kind"] == kind for a in out) > 1:
            raise ConfigError(f"fetch.assets: at most one asset of kind '{kind}'")
    archs = [a.get("arch") for a in out if a["kind"] == "dinov2"]  # None: evaluate.dinov2_arch
    if len(archs) != len(set(archs)):
        raise ConfigError("fetch.assets: at most one asset of kind 'dinov2' per arch (set `arch` on each: e.g. "
                          "vits14 for ADD's features, vitl14 for FD-DINOv2)")
    return out


def _cache_path(cache_dir: Path, asset: dict) -> Path:
    """Where a downloaded asset lives: `<cache_dir>/<name><extension of the url>`."""
    suffix = Path(urllib.parse.urlparse(asset.get("url") or "").path).suffix
    return cache_dir / f"{asset['name']}{suffix}"


def _path_key(asset: dict) -> str:
    """The config key that names an asset's local path (a diffusers teacher's is teacher.path)."""
    return "teacher.path" if asset["index"] == "teacher" else f"fetch.assets[{asset['index']}].path"


def _hint(asset: dict, cache_path: Path) -> str:
    return f"download it elsewhere and set {_path_key(asset)}: /path/to/file (or place it at {cache_path})"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", None) or exc
    text = str(reason).strip() or type(reason).__name__
    return text.splitlines()[0][:160]


def download(url: str, dest: Path, part: Path, asset: dict, timeout: float) -> None:
    """Download `url` to `dest`, resuming from `part` with an HTTP Range request when it exists.

    The partial file is kept on failure so the next run continues where this one stopped;
    `dest` appears (by rename) only once the transfer is complete.
    """
    name, hint = asset["name"], _hint(asset, dest)
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "sida-pipeline-fetch"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file already holds everything
            os.replace(part, dest)
            return
        raise AssetError(f"asset '{name}' not available: {url} could not be reached ({_reason(exc)}); {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AssetError(f"asset '{name}' not available: {url} could not be reached ({_reason(exc)}); {hint}") from None
    with resp:
        length = resp.headers.get("Content-Length")
        resumed = have > 0 and resp.status == 206
        if have and not resumed:
            log(f"{name}: server ignored the resume request; starting over")
            have = 0
        total = have + int(length) if length is not None and length.isdigit() else None
        if resumed:
            log(f"{name}: resuming at {have / 1e6:.1f} MB")
        done, last = have, 0.0
        part.parent.mkdir(parents=True, exist_ok=True)  # only now: an unreachable url leaves no trace
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY_S:
                        last = now
                        pct = f" ({100 * done / total:.0f}%)" if total else ""
                        log(f"{name}: {done / 1e6:.1f}" + (f" / {total / 1e6:.1f}" if total else "") + f" MB{pct}")
        except (OSError, ValueError, EOFError) as exc:  # includes IncompleteRead, resets, timeouts
            raise AssetError(f"asset '{name}': download of {url} was interrupted after {done / 1e6:.1f} MB "
                             f"({_reason(exc)}); rerun to resume from {part}") from None
    if total is not None and done != total:
        raise AssetError(f"asset '{name}': download of {url} stopped at {done} of {total} bytes; rerun to "
                         f"resume from {part}")
    log(f"{name}: downloaded {done / 1e6:.1f} MB")
    os.replace(part, dest)


def _resolve_folder(asset: dict, cache_dir: Path, timeout: float) -> Path:
    """A multi-file asset (the VAE) downloaded file by file into <cache_dir>/<name>/, each checked
    against its sha256; files already there with the right hash are kept."""
    folder = cache_dir / asset["name"]
    base = asset["url"].rstrip("/") + "/"
    for fname, want in asset["files"].items():
        dest = folder / fname
        if dest.is_file() and (want is None or sha256_file(dest) == want):
            continue
        sub = dict(asset, name=f"{asset['name']}/{fname}")
        try:
            download(base + fname, dest, folder / f"{fname}.part", sub, timeout)
        except AssetError:
            files = ", ".join(asset["files"])
            raise AssetError(f"asset '{asset['name']}' not available: {base + fname} could not be reached; place "
                             f"{files} in {folder} (or set {_path_key(asset)} to a folder holding "
                             f"them)") from None
    return folder


def resolve_asset(asset: dict, cache_dir: Path, timeout: float) -> tuple[Path, str | None]:
    """Local path of an asset (local file, cache hit or fresh download) and its sha256 if computed."""
    name, want = asset["name"], asset["sha256"]
    cache = _cache_path(cache_dir, asset)
    if asset.get("path"):
        p = Path(os.path.expandvars(str(asset["path"]))).expanduser()
        if not p.exists():
            raise AssetError(f"asset '{name}' not available: {p} does not exist; {_hint(asset, cache)}")
        return p, None
    if asset.get("hub"):  # teacher.hub: a diffusers pipeline from the Hugging Face hub
        from .diffusers_teacher import download_hub_pipeline

        return download_hub_pipeline(asset["hub"], cache_dir / name), None
    if asset.get("files"):  # a folder: the VAE, a diffusers teacher
        return _resolve_folder(asset, cache_dir, timeout), None
    if cache.is_file():
        digest = sha256_file(cache) if want else None
        if digest == want:
            log(f"{name}: using cached {cache}")
            return cache, digest
        log(f"{name}: cached {cache} has the wrong sha256; downloading again")
        cache.unlink()
    download(asset["url"], cache, cache_dir / f"{name}.part", asset, timeout)
    return cache, None


def verify_asset(asset: dict, path: Path, digest: str | None) -> str | None:
    """Check the sha256 the config gives (files only); return the file's sha256."""
    if path.is_dir():
        if asset["sha256"]:
            raise ConfigError(f"fetch.assets[{asset['index']}].sha256: {path} is a folder; sha256 applies "
                              f"to files only, remove it (list the folder's files under files)")
        for fname, want in (asset.get("files") or {}).items():
            f = path / fname
            if not f.is_file():
                raise AssetError(f"asset '{asset['name']}': {f} is missing; place it there (the folder needs "
                                 f"{', '.join(asset['files'])})")
            if want and sha256_file(f) != want:
                raise AssetError(f"asset '{asset['name']}': sha256 mismatch for {f}: the file is corrupt or a "
                                 f"different version: replace it or fix fetch.assets[{asset['index']}].files")
        return None
    digest = digest or sha256_file(path)
    want = asset["sha256"]
    if want and digest != want:
        if asset.get("path"):
            fix = f"the file is corrupt or a different version: replace it or fix fetch.assets[{asset['index']}].sha256"
        else:
            path.unlink(missing_ok=True)  # a bad download must not be picked up as a cache hit
            fix = "the download was corrupt or the url serves a different file (deleted; rerun to retry)"
        raise AssetError(f"asset '{asset['name']}': sha256 mismatch for {path}: got {digest}, expected {want}; {fix}")
    return digest

