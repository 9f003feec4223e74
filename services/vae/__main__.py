"""`python -m smartdiff.services.vae` (console script `smartdiff-vae`): run the vae service."""

import sys

import torch

from smartdiff.services.vae.server import start
from smartdiff.shared.serving import stage_main


def main(argv: list[str] | None = None) -> int:
    def run(model, layout, system, address, args):  # --dtype given: the VAE computes in it (default float32)
        return start(model, layout, system, address, getattr(torch, args.dtype) if args.dtype else None)

    return stage_main("vae", run, argv)


if __name__ == "__main__":
    sys.exit(main())
