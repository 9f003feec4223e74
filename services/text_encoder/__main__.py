"""`python -m smartdiff.services.text_encoder` (console script `smartdiff-text-encoder`): run the text_encoder service."""

import sys

from smartdiff.services.text_encoder.server import start
from smartdiff.shared.serving import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("text-encoder", lambda model, layout, system, address, args: start(model, layout, system, address),
                      argv)


if __name__ == "__main__":
    sys.exit(main())
