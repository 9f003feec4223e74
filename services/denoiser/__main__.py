"""`python -m smartdiff.services.denoiser` (console script `smartdiff-denoiser`): run the denoiser service."""

import sys

from smartdiff.services.denoiser.server import start
from smartdiff.shared.serving import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("denoiser", lambda model, layout, system, address, args: start(model, layout, system, address),
                      argv)


if __name__ == "__main__":
    sys.exit(main())
