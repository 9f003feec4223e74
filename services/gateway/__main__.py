"""`python -m smartdiff.services.gateway` (console script `smartdiff-gateway`): run the gateway service."""

import sys

from smartdiff.services.gateway.server import StageClients, start
from smartdiff.shared.serving import stage_main


def stage_flags(p) -> None:
    for stage in ("text-encoder", "denoiser", "vae"):
        p.add_argument(f"--{stage}", required=True, metavar="HOST:PORT",
                       help=f"address of the {stage} service (dns:///name:port balances over all its addresses)")


def start_gateway(model, layout, system, address, args):
    stages = StageClients(args.text_encoder, args.denoiser, args.vae)
    return start(model, stages, address, args.max_queue)


def main(argv: list[str] | None = None) -> int:
    return stage_main("gateway", start_gateway, argv, extra_flags=stage_flags)


if __name__ == "__main__":
    sys.exit(main())
