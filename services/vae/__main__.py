"""`python -m smartdiff.services.vae` (console script `smartdiff-vae`): run the vae service."""

import argparse
import sys

import torch

from smartdiff.services.vae.server import start
from smartdiff.services.vae.tiling import TilingConfig
from smartdiff.shared.config import ConfigError
from smartdiff.shared.serving import stage_main


def vae_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiling", type=TilingConfig.flag, metavar="TILE:OVERLAP[:FRAMES]",
                   help="tiles of the tiled decode (low-mem level >= 1), latent px, and video frames per decoder "
                        "call (left out: 1, the slowest); default per dtype: 48:4:4 for bfloat16, 40:4:2 for "
                        "float32 (about 2 GiB at any size); 48:6:4 blends seams over more pixels at some extra "
                        "time")


def main(argv: list[str] | None = None) -> int:
    def run(model, layout, system, address, args):
        if args.tiling is not None and system.low_mem_level < 1:
            raise ConfigError("--tiling sets the tiles of low-mem level 1 and up: add --low-mem-level 1")
        dtype = system.dtype if args.dtype else torch.float32  # the system default is not the VAE's: Wan's is fp32
        return start(model, layout, system, address, dtype, args.tiling)

    return stage_main("vae", run, argv, extra_flags=vae_flags)


if __name__ == "__main__":
    sys.exit(main())
