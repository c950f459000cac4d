"""sida: Score identity Distillation (SiD, SiDA, SiD2A) of EDM diffusion models.

The library behind every stage in `stages/`: networks, preconditioning, losses,
the distillation loop, data, checkpoints, distributed setup, tracking and metrics.
Modules are imported explicitly (``from sida import losses``) so that importing the
package stays cheap for the command-line stages.
"""

__version__ = "0.1.0"
