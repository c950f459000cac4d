"""Run tracking: a local JSONL of scalars (the source of truth) plus Weights & Biases.

Only the main process logs. The JSONL never depends on W&B being reachable or installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class Tracker:
    """Log per-tick scalars to `jsonl_path` (append) and, when enabled, to W&B."""

    def __init__(self, jsonl_path: str | Path | None, enabled: bool = True, cfg: dict | None = None,
                 stage: str = "", run_name: str = "", resume_step: float | None = None) -> None:
        self.enabled = enabled and jsonl_path is not None
        self.path = Path(jsonl_path) if jsonl_path is not None else None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
            elif self.path.exists():
                self.path.unlink()

    def log(self, scalars: dict[str, Any], step: float) -> None:
        """Append one record {step, **scalars}."""
        if not self.enabled:
            return
        rec = {"kimg": step}
        for k, v in scalars.items():
            v = float(v) if hasattr(v, "__float__") else v
            rec[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def log_image(self, key: str, path: str | Path, step: float) -> None:
        """Record an image file (the JSONL keeps its path)."""
        self.log({key: str(path)}, step)

    def summary(self, values: dict[str, Any]) -> None:
        """Final metrics of the run."""
        self.log({f"final/{k}": v for k, v in values.items()}, step=values.get("kimg", -1))

    def close(self) -> None:
        """Flush and finish."""


def truncate_jsonl(path: Path, max_step: float) -> None:
    """Drop records logged after `max_step` (a resumed run relogs them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("kimg", 0) <= max_step + 1e-9:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill: drop it and what follows
    path.write_text("".join(l + "\n" for l in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL file."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
