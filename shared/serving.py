"""What every stage process shares: system flags, loading the model source, running until SIGTERM with a drain."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from smartdiff.shared.argtypes import ranged_int, seconds
from smartdiff.shared.checkpoint import CheckpointLayout
from smartdiff.shared.config import ConfigError, ModelConfig
from smartdiff.shared.grpc_server import StageServer, check_address
from smartdiff.shared.memory import MemoryPolicyError, is_out_of_memory, oom_detail
from smartdiff.shared.model_source import resolve_model

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"gateway": 50050, "text-encoder": 50051, "denoiser": 50052, "vae": 50053}
DTYPES = ("bfloat16", "float16", "float32")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODEL_DIR_ENV = "SMARTDIFF_MODEL_DIR"  # the one environment variable: a default for --checkpoint


@dataclass(frozen=True)
class SystemConfig:
    """Per-deployment parameters of one stage process (flags / ConfigMap), resolved."""

    device: torch.device
    dtype: torch.dtype
    low_mem_level: int = 0
    max_queue: int = 8  # requests admitted at once (running + waiting); more -> RESOURCE_EXHAUSTED


def _device(text: str) -> str:
    """argparse type: a cpu or cuda torch device (whether this machine has it: system_from_args)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: the services run on cpu or cuda")
    return text


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="shipped model preset; default wan-tiny (random weights) without --checkpoint")
    p.add_argument("--checkpoint", type=Path, default=os.environ.get(MODEL_DIR_ENV) or None,
                   help=f"model folder, official Wan or Diffusers layout (default: ${MODEL_DIR_ENV})")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bfloat16 on GPU, float32 on CPU; "
                                                   "the vae service computes in float32 unless given)")
    p.add_argument("--device", type=_device, help="torch device (default: cuda if available, else cpu)")


def add_serve_flags(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--host", default="[::]", help="address to listen on (default all interfaces)")
    p.add_argument("--port", type=ranged_int(0, 65535), default=DEFAULT_PORTS[stage],
                   help=f"default {DEFAULT_PORTS[stage]}; 0 picks a free one (printed)")
    p.add_argument("--max-queue", type=ranged_int(1, 4096), default=8, help="requests admitted at once; more are refused")
    p.add_argument("--drain-seconds", type=seconds(), default=25.0, help="on SIGTERM, time given to in-flight requests")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    p.add_argument("--metrics-port", type=ranged_int(0, 65535), default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; 0 picks a free port)")
    if stage != "gateway":
        p.add_argument("--low-mem-level", type=int, default=0, choices=range(4),
                       help="0 all resident; 1 VAE tiling; 2 T5 on CPU; 3 DiT block offload")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs (as Wan serves), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def system_from_args(args: argparse.Namespace) -> SystemConfig:
    """The flags' SystemConfig; ConfigError for a --device this machine does not have."""
    device = torch.device(args.device) if getattr(args, "device", None) else default_device()
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else default_dtype(device)
    return SystemConfig(device, dtype, getattr(args, "low_mem_level", 0), getattr(args, "max_queue", 8))


def model_from_args(args: argparse.Namespace) -> tuple[ModelConfig, CheckpointLayout | None]:
    return resolve_model(args.model, args.checkpoint)


async def run_until_signal(server: StageServer, drain_seconds: float) -> None:
    """Serve until SIGTERM / SIGINT, then NOT_SERVING, drain in-flight requests, stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining for up to %.0f s", drain_seconds)
    await server.drain(drain_seconds)
    await exit_if_work_left()


async def exit_if_work_left(wait: float = 10.0) -> None:
    """After the drain: the server's stop cancelled the calls left, and their jobs end at their next check
    (within two DiT blocks: well under a second on a GPU). One still running on a worker thread `wait` seconds
    later (a block of the largest requests takes minutes on a CPU) would hold the process at interpreter exit,
    which joins the thread; its client was answered when the server stopped, so exit now instead."""
    from smartdiff.shared.worker import busy_workers

    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while busy_workers() and loop.time() < end:
        await asyncio.sleep(0.05)
    busy = busy_workers()
    if busy:
        log.warning("drained, with work still running on %s: exiting without waiting for it", ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def start_metrics(args: argparse.Namespace) -> None:
    """The process's /metrics endpoint when --metrics-port is set (shared/metrics.py); ConfigError if the port is
    taken. Started before the weights load, so a scrape also shows a stage that is still starting."""
    from smartdiff.shared.metrics import serve_metrics

    if args.metrics_port is None:
        return
    try:
        port = serve_metrics(args.metrics_port, args.host)
    except OSError as e:
        raise ConfigError(f"--metrics-port {args.metrics_port}: {e.strerror or e}") from None
    print(f"metrics {args.host}:{port}/metrics", flush=True)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# What a stage whose warm-up ran out of device memory can change (by service).
WARMUP_OOM_ADVICE = {
    "DenoiserService": "with --compile on (the CUDA default) it runs one guidance step at the model's default "
                       "size: start with --compile off (a tiny warm-up; the first request of each size then "
                       "compiles), --cfg-batch off (one guidance branch at a time; with --cfg-degree 1), "
                       "--low-mem-level 3 (the DiT streamed from host memory), or on a GPU with more memory",
    "VaeService": "it decodes two latent frames at the model's default size: start with --low-mem-level 1 (tiled "
                  "decode), smaller --tiling tiles, or --dtype bfloat16",
    "TextEncoderService": "it encodes one prompt: start with --low-mem-level 2 (the T5 on the CPU)",
}


async def start_stage(service_name: str, add_servicer, servicer, address: str, max_queue: int,
                      warmup=None) -> tuple[StageServer, int]:
    """Start a stage's server (NOT_SERVING), run its warm-up (a function on the servicer's StageWorker thread,
    where its requests will run, or off the loop if it has none; a coroutine function on the loop), then mark it
    SERVING; a warm-up that raises stops the server.

    Returns the server and the bound port. The servicer holds weights already loaded by the caller.
    """
    # Calls past this many in flight are refused at once (RESOURCE_EXHAUSTED): it bounds the uploads buffered
    # before the worker's own limit (max_queue, checked once a call's inputs are read); health watches don't count.
    server = StageServer([service_name], max_calls=max_queue + 4)
    add_servicer(servicer, server.server)
    port = server.add_port(address)
    try:
        await server.start()
        if inspect.iscoroutinefunction(warmup):
            await warmup()
        elif warmup is not None:
            worker = getattr(servicer, "worker", None)
            await (worker.run(warmup) if worker is not None else asyncio.to_thread(warmup))
    except BaseException as exc:  # a failed (or interrupted) start or warm-up must not leave the port bound
        await server.stop(0)
        oom = next((e for e in (exc, exc.__cause__) if e is not None and is_out_of_memory(e)), None)
        if oom is not None:  # not a traceback: say what ran and what to change (a multi-GPU runner wraps it)
            detail = oom_detail(oom)
            service = service_name.rsplit(".", 1)[-1]
            raise MemoryPolicyError(f"{service}: the warm-up before SERVING ran out of device memory ({detail}); "
                                    f"{WARMUP_OOM_ADVICE.get(service, 'start it on a GPU with more memory')}") from None
        raise
    await server.mark_serving()
    return server, port


def stage_main(stage: str, start, argv: list[str] | None = None, extra_flags=None) -> int:
    """Entry point of one stage process: flags -> load -> warm up -> SERVING -> run until SIGTERM.

    `start(model, layout, system, address, args)` loads the stage and returns (StageServer, port).
    """
    p = argparse.ArgumentParser(prog=f"smartdiff serve {stage}", description=f"Run the {stage} service.")
    add_model_flags(p)
    add_serve_flags(p, stage)
    if extra_flags is not None:
        extra_flags(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    from smartdiff.shared.checkpoint import CheckpointError
    from smartdiff.shared.config import ConfigError
    from smartdiff.shared.memory import MemoryPolicyError

    try:
        model, layout = model_from_args(args)
        system = system_from_args(args)
        start_metrics(args)
    except (ConfigError, CheckpointError, MemoryPolicyError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    async def serve() -> None:
        await check_address(f"{args.host}:{args.port}")
        server, port = await start(model, layout, system, f"{args.host}:{args.port}", args)
        print(f"{stage} {args.host}:{port} SERVING", flush=True)
        await run_until_signal(server, args.drain_seconds)

    try:
        asyncio.run(serve())
    except (ConfigError, CheckpointError, MemoryPolicyError) as e:  # found while loading the weights
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # SIGINT while loading, before the drain's handler was in place
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
