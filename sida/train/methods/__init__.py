"""The distillation methods, one file each; `DistillLoop` runs the run's method's class.

- `sid.SiD`: SiD, SiDA and SiD2A (phases warmup, sid, sida; discriminator none or sida);
- `dmd.DMD`: DMD and DMD2 (phases warmup, dmd, dmd2; discriminator none or dmd2_head);
- `add.ADD`: ADD (phases warmup, add; discriminator none or add).

A method is a `base.Method`: per micro-batch slot, a critic objective and a generator objective
that return (loss, stats), drawing through the loop's public `sida.train.draws.Draws`. The loop
owns the rest (accumulation, optimiser updates, EMA, the generator's turn, checkpoints, guards).

Adding a method: write `methods/<name>.py` with a `Method` subclass (its objectives, and
`build_head` if its critic has an extra network) and add it to `METHODS` below; then declare it
in the config schema (`workflow/schemas/config.schema.yaml`): its entry in `x-methods` (its phase
kinds, the discriminators its runs may train, the phases that need one), the new kinds in the phase
`kind` enum and a new critic network in the `discriminator` enum, plus any new `distill` settings
with their defaults. tests/test_presets.py checks that the table and the classes agree.
"""

from __future__ import annotations

from .add import ADD
from .base import Method
from .dmd import DMD
from .sid import SiD

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SiD, DMD, ADD)}


def method_class(name: str) -> type[Method]:
    """The class of a run's method (`sida.run.config.run_method`: 'sid', 'dmd' or 'add')."""
    return METHODS[name]


__all__ = ["ADD", "DMD", "METHODS", "Method", "SiD", "method_class"]
