"""`python -m smartdiff.services.vae` (console script `smartdiff-vae`): run the vae service."""

import sys

from smartdiff.services.vae.server import start
from smartdiff.shared.serving import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("vae", lambda model, layout, system, address, args: start(model, layout, system, address),
                      argv)


if __name__ == "__main__":
    sys.exit(main())
