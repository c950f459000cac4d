"""Stage `export`: a distilled generator out of the pipeline, in a format users load.

    python -m stages.export --network results/EXP/RUN/network.pt --out DIR
    python -m stages.export --config FILE --run RUN [--out DIR] [--set key=value ...]

Writes DIR/generator.safetensors, DIR/generator.json (class, kwargs, generation sigmas, image
shape, classes: generation needs no config), DIR/README.md and, for a generator distilled from a
diffusers teacher, DIR/unet/ (a diffusers UNet2DModel folder), for one distilled from a text-to-image
teacher the parts of a StableDiffusionPipeline (text encoder, tokenizer and VAE copied from the
teacher's folder, --teacher or the one the network records); see `sida.io.export`. Load it with
``sida.load_generator(DIR)``. With --config the network is the run's final EMA generator
(<results_dir>/<experiment>/<run>/network.pt) and DIR defaults to <experiment>/export/<run>.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from sida.errors import ConfigError
from sida.run.cli import run_stage, stage_parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: find the network file, export it."""
    parser = stage_parser("python -m stages.export", "Export a distilled generator (safetensors + config + loader).")
    parser.add_argument("--network", default=None, help="a generator's network.pt (default: the --run's)")
    parser.add_argument("--run", default=None, help="a distillation run of the --config")
    parser.add_argument("--out", default=None, help="output folder (default: <results_dir>/<experiment>/export/<run>)")
    parser.add_argument("--teacher", default=None, help="a text generator's teacher pipeline folder, whose text "
                        "encoder, tokenizer and VAE are exported with it (default: the folder the network records)")
    args = parser.parse_args(argv)
    if args.network is None or args.out is None:
        if args.run is None:
            raise ConfigError("stages.export: pass --network and --out, or --config with --run")
        from sida.run.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.run not in cfg["distill"]["runs"]:
            raise ConfigError(f"stages.export: --run {args.run}: the config has no such run (its runs: "
                              f"{', '.join(cfg['distill']['runs'])})")
        exp = Path(cfg["results_dir"]) / cfg["experiment"]
        args.network = args.network or str(exp / args.run / "network.pt")
        args.out = args.out or str(exp / "export" / args.run)
    from sida.io.checkpoints import load_network
    from sida.io.export import export_generator

    net = load_network(args.network)
    if not getattr(net, "sida_meta", {}).get("one_step"):
        raise ConfigError(f"stages.export: {args.network} is not a distilled generator (a teacher?): export the "
                          f"network.pt of a distillation run")
    cfg = export_generator(net, args.out, teacher_dir=args.teacher)
    print(f"export: wrote {args.out} ({cfg['class']}, sigma_init {cfg['sigma_init']:.4g}); load it with "
          f"sida.load_generator({args.out!r})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_stage(main)
