"""`python -m smartdiff.services.denoiser` (console script `smartdiff-denoiser`): run the denoiser service.

One process: `smartdiff serve denoiser --port 50052 ...`.
N GPUs of one pod: `smartdiff serve denoiser --nproc-per-node N --cfg-degree C --ulysses-degree U --ring-degree R
...` with N = C x U x R starts one process per GPU (launch.py); rank 0 serves gRPC, the other ranks follow it.
`torchrun --nproc-per-node N -m smartdiff.services.denoiser ...` works too, but cannot drain longer than 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from smartdiff.services.denoiser.distributed import (
    ProcessInfo, RankZeroRunner, RequestChannel, header_group, init_distributed, worker_loop,
)
from smartdiff.services.denoiser.launch import LAUNCHED_ENV, launch
from smartdiff.services.denoiser.parallel import ParallelConfig, ParallelConfigError
from smartdiff.services.denoiser.server import (
    add_denoiser_flags, check_options, load_engine, options_from_args, start,
)
from smartdiff.shared.argtypes import ranged_int
from smartdiff.shared.checkpoint import CheckpointError
from smartdiff.shared.config import ConfigError
from smartdiff.shared.grpc_server import check_address
from smartdiff.shared.memory import MemoryPolicyError
from smartdiff.shared.serving import (
    add_model_flags, add_serve_flags, model_from_args, run_until_signal, setup_logging, start_metrics,
    system_from_args,
)

log = logging.getLogger("smartdiff.denoiser")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartdiff serve denoiser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_serve_flags(p, "denoiser")
    add_denoiser_flags(p)
    p.add_argument("--nproc-per-node", type=ranged_int(1, 64), default=1,
                   help="start this many ranks, one per GPU (CFG x Ulysses x ring degrees), and pass SIGTERM on to "
                        "them so that they drain for --drain-seconds (torchrun SIGKILLs its ranks after 30 s)")
    return p


def launching(args) -> bool:
    """Whether this process starts the ranks (--nproc-per-node > 1, not itself one of them)."""
    if args.nproc_per_node == 1 or os.environ.get(LAUNCHED_ENV):
        return False
    if "RANK" in os.environ:
        raise ConfigError("--nproc-per-node: this process is already a rank of another launcher (torchrun); "
                          "use one of the two")
    return True


async def serve(args, model, layout, system, options, engine=None, runner=None) -> None:
    server, port = await start(model, layout, system, f"{args.host}:{args.port}", options, engine, runner)
    print(f"denoiser {args.host}:{port} SERVING", flush=True)
    await run_until_signal(server, args.drain_seconds)


def check_launch(nproc: int, options, model, device) -> None:
    """What the launcher checks before it starts any rank: the layout fills the ranks, and the GPUs exist."""
    ParallelConfig(options.cfg_degree, options.ulysses_degree, options.ring_degree).validate(nproc,
                                                                                             model.dit.num_heads)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--nproc-per-node {nproc}: one GPU per rank, and this machine has "
                          f"{torch.cuda.device_count()}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # SIGINT before the server's own handler was in place: nothing to drain yet
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    proc = ProcessInfo.from_env()
    try:
        model, layout = model_from_args(args)
        system = system_from_args(args)
        options = options_from_args(args)
        check_options(options, model, system.device, system.dtype)  # every rank: all exit on a bad flag
        if launching(args):
            check_launch(args.nproc_per_node, options, model, system.device)
            return launch(sys.argv[1:] if argv is None else list(argv), args.nproc_per_node)
        state, device = init_distributed(proc, options, model, system.device)
    except (ConfigError, CheckpointError, ParallelConfigError, MemoryPolicyError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        if proc.rank == 0:  # the process that serves gRPC: its port must be free before the weights load
            start_metrics(args)
            asyncio.run(check_address(f"{args.host}:{args.port}"))
        if proc.world_size == 1:
            asyncio.run(serve(args, model, layout, system, options))
            return 0
        engine = load_engine(model, layout, system, options, device=device, parallel=state)
    except (ConfigError, CheckpointError, MemoryPolicyError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    channel = RequestChannel(device, header_group())
    log.info("rank %d/%d ready (%s, %s)", proc.rank, proc.world_size, state.config, device)
    try:
        if proc.rank == 0:
            runner = RankZeroRunner(engine, channel)
            try:
                asyncio.run(serve(args, model, layout, replace(system, device=device), options, engine, runner))
            except (ConfigError, MemoryPolicyError) as e:  # the port, taken since it was checked; the warm-up's OOM
                # on this rank (the runner reports it with the OOM as its cause; a follower's OOM ends that rank,
                # and the launcher then stops this one)
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 2
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):  # drained: a second signal must not cut the shutdown
                    signal.signal(sig, signal.SIG_IGN)
                runner.shutdown()
        else:  # SIGTERM reaches every process of the pod: rank 0 drains, then tells the others to stop
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            worker_loop(engine, model, options, channel)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
