"""Stage `fetch`: obtain, verify and convert the external assets an experiment needs.

    python -m stages.fetch --config FILE [--out DIR] [--set key=value ...]

For each entry of ``fetch.assets`` (``{name, kind, url, path, sha256}``, kind one of teacher,
dataset, refstats, inception, sid_generator, vae, dinov2, captions, clip, images):
1. resolve it (`sida.io.assets`): ``path`` (a local file or folder) wins over ``url``; else a
   cached copy in ``fetch.cache_dir`` (checked against sha256 when given); else download it with
   urllib, resuming an interrupted download from ``<cache_dir>/<name>.part`` via an HTTP Range request;
2. verify its sha256 when the config gives one (`sida.io.assets`);
3. convert it (here): EDM / SiD pickles are imported without executing their code and saved in our
   network format (``teacher.pt``, ``<name>.pt`` for SiD generators), reference statistics are
   validated and copied to ``refstats.npz`` (EDM2's ``img512.pkl``, read without running code, gives
   ``refstats.npz`` for FID and ``refstats-dinov2.npz`` for FD-DINOv2), Inception weights are placed
   at ``inception-2015-12-05.pt``, DINOv2 weights at ``dinov2_<arch>.pth``, the VAE folder (kind
   ``vae``: ``url`` is the folder's base URL and ``files`` maps each file to its sha256) at ``vae/``
   (loaded once with diffusers, local files only), datasets are opened (checked) with the ``data:``
   settings; a captions file (checked to read as prompts) and CLIP weights are placed at
   ``<name><suffix>``, reference images (a folder or zip) are counted and used where they are;
   EDM2 teachers' latent scale/bias and loss P_mean/P_std go to the manifest; with
   ``teacher.source: diffusers`` the teacher is ``teacher.path`` (or the pipeline folder at
   ``teacher.url``, or the Hugging Face hub repository ``teacher.hub``, downloaded into
   ``<cache_dir>/teacher``): a diffusers UNet2DModel + scheduler, or a Stable Diffusion 1.x / 2.x / SDXL
   text-to-image pipeline, wrapped as an EDM denoiser;
4. write ``manifest.json`` (what came from where, with hashes) last.
Outputs are staged in a temporary folder and moved into place only when every asset succeeded,
so a failed run leaves the previous outputs (or none) and never half of a new set.
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

from sida.errors import AssetError
from sida.io.assets import check_assets, log, resolve_asset, sha256_file, verify_asset
from sida.io.atomic import atomic_write_json
from sida.io.diffusers_teacher import diffusers_teacher_assets
from sida.run.cli import run_stage, stage_parser


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link when possible (weights are hundreds of MB), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _import_network(path: Path) -> tuple[Any, dict]:
    """(our network, snapshot facts) from an EDM/EDM2/SiD pickle (no code executed), a file we
    wrote, or a diffusers folder (a UNet2DModel and its scheduler, or a text-to-image pipeline; see
    sida.io.diffusers_teacher)."""
    from sida.io.edm_pickle import load_edm_pickle_with_info, load_edm_state

    if path.is_dir():
        from sida.io.diffusers_teacher import load_teacher

        return load_teacher(path), {}

    if zipfile.is_zipfile(path):  # torch.save output: our network format or an EDM-style export
        import torch

        rec = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(rec, dict) and rec.get("format") == "sida-network":
            from sida.io.checkpoints import load_network

            return load_network(path), {}
        return load_edm_state(path), {}
    net, info = load_edm_pickle_with_info(path)
    return net, {k: v for k, v in info.items() if k in ("network", "encoder", "loss")}


def _check_latent_constants(name: str, info: dict, cfg: dict) -> None:
    """An EDM2 snapshot's latent scale/bias must be the config's (else decoding would be wrong)."""
    from sida.io.latents import codec_from_config, is_latent

    enc = info.get("encoder") or {}
    if is_latent(cfg) and "scale" in enc and "bias" in enc:
        codec_from_config(cfg).check_against(enc["scale"], enc["bias"], f"asset '{name}'")


def _warn_shape_mismatch(name: str, kwargs: dict, data: dict) -> None:
    # A warning, not an error: fetching may precede fixing `data:`, but the mismatch would
    # otherwise surface much later as a shape error inside the distillation loop.
    have = (kwargs.get("img_resolution"), kwargs.get("img_channels"), kwargs.get("label_dim", 0))
    want = (data.get("resolution"), data.get("channels"), data.get("label_dim"))
    if None not in want and have != want:
        print(f"warning: {name} is a {have[0]}x{have[0]}x{have[1]} network with label_dim={have[2]} but "
              f"data: says {want[0]}x{want[0]}x{want[1]} with label_dim={want[2]}: set data.resolution, "
              f"data.channels and data.label_dim to match", file=sys.stderr, flush=True)


def convert_asset(asset: dict, path: Path, digest: str | None, stage: Path, cfg: dict) -> dict:
    """Write the asset's converted output into `stage`; return its manifest entry."""
    from sida.io.checkpoints import save_network

    kind, name = asset["kind"], asset["name"]
    entry: dict[str, Any] = {"name": name, "kind": kind, "source": asset.get("path") or asset.get("url"),
                             "sha256": digest, "size": path.stat().st_size if path.is_file() else None,
                             "local_path": str(path.resolve()), "output": None}
    meta = {"source": entry["source"], "sha256": digest, "asset": name}
    if kind in ("teacher", "sid_generator"):
        net, info = _import_network(path)
        out = "teacher.pt" if kind == "teacher" else f"{name}.pt"
        save_network(stage / out, net, meta=dict(meta, snapshot=info) if info else meta)
        entry.update(output=out, network={"class": type(net).__name__, "kwargs": net.init_kwargs})
        if info:
            entry["snapshot"] = info  # EDM2: the latent encoder's scale/bias, the loss's P_mean/P_std
            _check_latent_constants(name, info, cfg)
        _warn_shape_mismatch(name, net.init_kwargs, cfg.get("data") or {})
    elif kind == "refstats":
        from sida.eval.refstats import PICKLE_METRICS, load_ref_stats, load_stats_pickle, save_ref_stats

        if zipfile.is_zipfile(path):  # .npz (EDM fid-refs, clean-fid): one metric, FID
            mu, sigma = load_ref_stats(path)
            save_ref_stats(stage / "refstats.npz", mu, sigma)
            entry.update(output="refstats.npz", dims=int(mu.shape[0]))
        else:  # EDM2's img512.pkl: {fid: {mu, sigma}, fd_dinov2: {mu, sigma}}, read without running code
            stats = load_stats_pickle(path)
            outputs, dims = [], {}
            for metric, (mu, sigma) in stats.items():
                extractor = PICKLE_METRICS.get(metric)
                if extractor is None:
                    continue
                out = "refstats.npz" if extractor == "inception" else f"refstats-{extractor}.npz"
                save_ref_stats(stage / out, mu, sigma)
                outputs.append(out)
                dims[metric] = int(mu.shape[0])
            if not outputs:
                raise AssetError(f"asset '{name}': {path} holds no known metric ({', '.join(stats)}; known: "
                                 f"{', '.join(PICKLE_METRICS)})")
            entry.update(output=outputs[0], outputs=outputs, dims=dims)
    elif kind == "inception":
        # Evaluation looks for the weights beside the other fetched assets (evaluate.inception_weights
        # null = <fetch dir>/inception-2015-12-05.pt).
        out = "inception-2015-12-05.pt"
        if path.is_dir():
            raise AssetError(f"asset '{name}': {path} is a folder, expected the Inception weights file")
        _link_or_copy(path, stage / out)
        entry.update(output=out)
    elif kind == "vae":
        from sida.io.latents import VAE_FILES, load_vae

        if not path.is_dir():
            raise AssetError(f"asset '{name}': {path} is a file; a vae asset is a folder with {', '.join(VAE_FILES)}")
        (stage / "vae").mkdir()
        files = {}
        for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(".part")):
            _link_or_copy(f, stage / "vae" / f.name)
            files[f.name] = sha256_file(f)
        vae = load_vae(stage / "vae")  # checks the folder loads (local files only)
        entry.update(output="vae", files=files, vae={"class": type(vae).__name__,
                                                     "latent_channels": int(vae.config.latent_channels)})
    elif kind == "dinov2":
        import torch
        from sida.nets.vit import dinov2_timm_state

        # the asset's own arch (ADD's ViT-S/14 feature network), else FD-DINOv2's
        arch = asset.get("arch") or (cfg.get("evaluate") or {}).get("dinov2_arch", "vitl14")
        out = f"dinov2_{arch}.pth"
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AssetError(f"asset '{name}': {path} is not a DINOv2 checkpoint ({type(exc).__name__}): "
                             f"download it again") from None
        dinov2_timm_state(sd, str(path))  # the layout check; the extractor converts on load
        _link_or_copy(path, stage / out)
        entry.update(output=out, arch=arch)
    elif kind in ("captions", "clip"):
        # Evaluation finds them by asset name beside the other fetched assets (sida.eval.zero_shot);
        # the suffix stays: it tells a captions file's format.
        if path.is_dir():
            raise AssetError(f"asset '{name}': {path} is a folder, expected the {kind} file")
        if kind == "captions":
            from sida.eval.coco import read_captions

            entry["captions"] = len(read_captions(path, name))
        out = f"{name}{path.suffix}"
        _link_or_copy(path, stage / out)
        entry.update(output=out)
    elif kind == "images":  # COCO's 40,504 images stay where they are; the manifest records where
        from sida.eval.coco import list_reference_images

        entry.update(images=len(list_reference_images(path)))
    elif kind == "dataset":
        from sida.io.data import open_dataset
        from sida.io.latents import codec_from_config

        data_cfg = dict(cfg.get("data") or {})
        if data_cfg.get("kind") == "edm2_latents":  # EDM2's encoded zip: keep the kind
            data_cfg.update(path=str(path.resolve()))
        else:
            data_cfg.update(kind="folder" if path.is_dir() else "edm_zip", path=str(path.resolve()))
        ds = open_dataset(data_cfg, codec_from_config(cfg))
        entry.update(data={k: data_cfg[k] for k in ("kind", "path")}, images=len(ds),
                     shape=[ds.resolution, ds.resolution, ds.channels])
    log(f"{name}: ok ({kind}{', -> ' + entry['output'] if entry['output'] else ''})")
    return entry


def fetch(cfg: dict, out_dir: Path) -> dict:
    """Resolve, verify and convert every asset of `cfg['fetch']`; write outputs and the manifest."""
    fcfg = cfg.get("fetch") or {}
    assets = check_assets(fcfg) + diffusers_teacher_assets(cfg)
    cache_dir = Path(fcfg.get("cache_dir") or "results/cache")
    timeout = float(fcfg.get("timeout_s", 30))
    # Resolve and verify everything before writing any output: a missing asset fails fast.
    resolved = []
    for a in assets:
        path, digest = resolve_asset(a, cache_dir, timeout)
        resolved.append((a, path, verify_asset(a, path, digest)))
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f".fetch-staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        entries = [convert_asset(a, p, d, stage, cfg) for a, p, d in resolved]
        # The old manifest goes first, so an interruption while moving leaves no manifest that
        # vouches for a mix of old and new outputs.
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for e in entries:  # all conversions succeeded: move them into place
            for out in e.get("outputs") or ([e["output"]] if e["output"] else []):
                if (out_dir / out).is_dir():  # a folder output (the VAE) replaces the old folder
                    shutil.rmtree(out_dir / out)
                os.replace(stage / out, out_dir / out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = {"experiment": cfg.get("experiment"), "assets": entries}
    atomic_write_json(out_dir / "manifest.json", manifest)  # last: its presence means "all done"
    log(f"wrote {out_dir / 'manifest.json'} ({len(entries)} asset(s))")
    return manifest


def _load_config(path: str, overrides: Sequence[str]) -> dict:
    from sida.run.config import load_config

    return load_config(path, overrides)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: parse flags, load the config, fetch."""
    parser = stage_parser("python -m stages.fetch", "Download, verify and convert teacher/data/statistics assets.")
    parser.add_argument("--out", default=None, help="output folder (default: <results_dir>/<experiment>/fetch)")
    args = parser.parse_args(argv)
    cfg = _load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.get("results_dir", "results")) / cfg["experiment"] / "fetch"
    fetch(cfg, out)


if __name__ == "__main__":
    run_stage(main)
