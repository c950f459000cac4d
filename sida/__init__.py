"""sida: Score identity Distillation (SiD, SiDA, SiD2A) of EDM diffusion models.

The library behind every stage in `stages/`: networks, preconditioning, losses,
the distillation loop, data, checkpoints, distributed setup, tracking and metrics.
Modules are imported explicitly (``from sida import losses``) so that importing the
package stays cheap for the command-line stages.
"""

__version__ = "0.1.0"

import os as _os

# libgomp (torch's OpenMP) lets idle threads spin between parallel regions by default. On a
# machine where anything else runs, a spinning thread holds a core its partner needs to finish
# the region: a digits SiD iteration with 2 threads took 19 s instead of 0.5 s on a 2-core
# machine at load 12 (1 thread: 1.6 s). Waiting passively avoids that at the price of a wake-up
# per parallel region on an idle machine; OMP_WAIT_POLICY=ACTIVE in the environment restores
# spinning. Only effective before torch is first imported: entry points import sida first.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_generator(path, device="cpu"):
    """A generator exported by `python -m stages.export`: ``G(z, labels=None, steps=1) -> images``,
    for text-to-image generators ``G(z, prompts=[...])`` or ``G(z, cond=embeddings)`` (see
    `sida.io.export`; needs torch and safetensors only, diffusers/transformers for diffusers UNets)."""
    from .io.export import load_generator as _load

    return _load(path, device)
