"""Run tracking: a local JSONL of scalars (the source of truth) plus Weights & Biases.

Only the main process logs (callers pass ``enabled=dist_info.is_main``). The JSONL never
depends on W&B being reachable, installed or working: every W&B call is guarded, and the
first failure prints one line, ``warning: W&B logging disabled: <reason>``, and turns W&B off
for the rest of the run while training and the JSONL go on.

W&B mode (first match wins):
1. ``disabled`` in either the config (``wandb.mode``) or the environment (``WANDB_MODE``):
   no W&B at all (wandb is not even imported, no ``wandb/`` directory is written);
2. the environment variable ``WANDB_MODE`` (W&B's own convention, and how a cluster job or
   the container switches a whole workflow online or offline without editing configs);
3. the config's ``wandb.mode`` (schema default ``offline``);
4. ``offline``.
Offline runs land in ``results/<experiment>/wandb/offline-run-*`` (see `wandb_dir`; ``WANDB_DIR``
overrides), never in ``wandb/`` at the repository root; ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

#: W&B modes we pass on; anything else is a configuration mistake reported as a warning.
WANDB_MODES = ("online", "offline", "disabled", "shared")


class Tracker:
    """Log per-tick scalars to `jsonl_path` (append) and, when enabled, to W&B.

    `cfg` is the resolved experiment config (its ``experiment``, ``wandb`` section and hash name
    and group the W&B run); `stage` becomes the run's ``job_type``; `run_name` its display name
    (default: the stage). `resume_step` (kimg) keeps JSONL records up to that step, for a
    resumed stage that relogs what follows.
    """

    def __init__(self, jsonl_path: str | Path | None, enabled: bool = True, cfg: dict | None = None,
                 stage: str = "", run_name: str = "", resume_step: float | None = None) -> None:
        self.enabled = enabled and jsonl_path is not None
        self.path = Path(jsonl_path) if jsonl_path is not None else None
        self.wandb_run: Any = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
            elif self.path.exists():
                self.path.unlink()
            self.wandb_run = _start_wandb(cfg or {}, stage, run_name, self.path)

    def log(self, scalars: dict[str, Any], step: float) -> None:
        """Append one record {kimg: step, **scalars} to the JSONL, and to W&B (x-axis: kimg)."""
        if not self.enabled:
            return
        self._append(scalars, step)
        if self.wandb_run is not None:
            # W&B gets the raw floats (it plots NaN/inf itself); non-numbers stay out of its charts.
            values = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in scalars.items()}
            values = {k: v for k, v in values.items() if isinstance(v, (int, float, bool))}
            self._wandb_call(lambda: self.wandb_run.log({**values, "kimg": float(step)}))

    def summary(self, values: dict[str, Any]) -> None:
        """Final metrics of the run (JSONL: a ``final/<key>`` record; W&B: the run summary)."""
        if not self.enabled:
            return
        self._append({f"final/{k}": v for k, v in values.items()}, step=values.get("kimg", -1))
        if self.wandb_run is not None:
            clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
            self._wandb_call(lambda: self.wandb_run.summary.update(clean))

    def _append(self, scalars: dict[str, Any], step: float) -> None:
        """One JSONL record; non-finite floats become null (JSON has no NaN)."""
        rec: dict[str, Any] = {"kimg": step}
        for k, v in scalars.items():
            v = float(v) if hasattr(v, "__float__") else v
            rec[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        """Flush and finish (idempotent); an offline run prints its ``wandb sync`` command."""
        run, self.wandb_run = self.wandb_run, None
        if run is not None:
            try:
                run.finish()
            except Exception as exc:  # noqa: BLE001 - W&B must never fail a finished stage
                _warn(exc)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wandb_call(self, fn: Any) -> None:
        """Run one W&B call; on failure warn once and stop using W&B (the JSONL carries on)."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - any W&B failure, by design
            _warn(exc)
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001 - already reported; nothing more to say
                pass


def wandb_mode(cfg: dict | None = None, environ: dict | None = None) -> str:
    """The W&B mode for `cfg` under `environ` (see the module docstring for the precedence)."""
    environ = os.environ if environ is None else environ
    cfg_mode = ((cfg or {}).get("wandb") or {}).get("mode")
    env_mode = environ.get("WANDB_MODE") or None
    if "disabled" in (cfg_mode, env_mode):
        return "disabled"
    return env_mode or cfg_mode or "offline"


def wandb_run_id(cfg: dict | None, stage: str, run_name: str = "") -> str:
    """A deterministic W&B run id: the same experiment, stage, run and config give the same id.

    So a resumed stage continues its run when online (``resume='allow'``). The ``wandb`` section
    is left out of the hash: switching online/offline is not a different run.
    """
    from .config import config_hash

    cfg = cfg or {}
    experiment = str(cfg.get("experiment", "")) or "run"
    h = config_hash({k: v for k, v in cfg.items() if k != "wandb"})
    digest = hashlib.sha256(f"{experiment}\0{stage}\0{run_name}\0{h}".encode()).hexdigest()[:12]
    # Readable prefix for `wandb/offline-run-*-<id>` directories; W&B forbids / \ # ? % : in ids.
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(p for p in (experiment, stage, run_name) if p))
    return f"{prefix[:80]}-{digest}"


def wandb_dir(cfg: dict | None, jsonl_path: str | Path) -> Path:
    """Where W&B writes (its ``wandb/`` directory goes inside): the experiment's results
    directory when the JSONL lies under one (``results/<experiment>/``, so one ``wandb sync``
    covers every stage and run), else the JSONL's own directory. Never the repository root."""
    jsonl_path = Path(jsonl_path)
    experiment = (cfg or {}).get("experiment")
    for parent in jsonl_path.parents:
        if experiment and parent.name == experiment:
            return parent
    return jsonl_path.parent


def _warn(reason: Any) -> None:
    if isinstance(reason, BaseException):
        text = str(reason).strip().splitlines()
        reason = f"{type(reason).__name__}: {text[0]}" if text else type(reason).__name__
    print(f"warning: W&B logging disabled: {reason}", file=sys.stderr, flush=True)


def _start_wandb(cfg: dict, stage: str, run_name: str, jsonl_path: Path) -> Any:
    """Start the W&B run for this stage, or return None (disabled, or failed with one warning)."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    if mode not in WANDB_MODES:
        _warn(f"invalid W&B mode '{mode}' (from {'WANDB_MODE' if os.environ.get('WANDB_MODE') else 'wandb.mode'}): "
              f"use one of {', '.join(WANDB_MODES)}")
        return None
    try:
        import wandb
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        _warn(exc)
        return None
    wcfg = cfg.get("wandb") or {}
    work_dir = Path(os.environ.get("WANDB_DIR") or wandb_dir(cfg, jsonl_path))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=wcfg.get("project") or "sida-pipeline",
            entity=wcfg.get("entity"),
            group=cfg.get("experiment") or None,
            job_type=stage or None,
            name=run_name or stage or None,
            id=wandb_run_id(cfg, stage, run_name),
            resume="allow",
            config=cfg,
            dir=str(work_dir),
            mode=mode,
            tags=[t for t in (stage, run_name) if t],
            notes=cfg.get("description") or None,
            # console off: stage output (one-line errors, progress) stays exactly as printed.
            settings=wandb.Settings(console="off"),
            reinit="finish_previous",
        )
        # Ticks are indexed by kimg, not by W&B's call counter, so resumed runs line up.
        run.define_metric("kimg")
        run.define_metric("*", step_metric="kimg")
        return run
    except Exception as exc:  # noqa: BLE001 - any init failure leaves training running
        _warn(exc)
        return None


def truncate_jsonl(path: Path, max_step: float) -> None:
    """Drop records logged after `max_step` (a resumed run relogs them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("kimg", 0) <= max_step + 1e-9:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            break  # a torn last line from a kill: drop it and what follows
    # Atomic: a kill during the rewrite must not lose the records a resumed run keeps.
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, "".join(l + "\n" for l in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL file."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
