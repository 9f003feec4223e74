"""The multi-GPU denoiser pod: one process per GPU (launch.py, or torchrun); rank 0 serves gRPC, every rank runs
each step.

For each request rank 0 broadcasts an op header, the DenoiseParams protobuf bytes and the embeddings (all
tensors, never pickles); every rank then validates the same params and runs the same denoising loop, and
rank 0 returns the latents. Cancellation: before each step and between DiT blocks rank 0 broadcasts its stop
flag; every rank acts on the flag of the previous check, so all stop at the same block, within about two blocks
of the cancel, and nobody waits for the GPU to finish its work to read it.

The op header travels on a gloo group of its own without a practical timeout, so an idle pod waits for its next
job for as long as it likes; the jobs' collectives run on the default group, with JOB_TIMEOUT. The ranks stay in
step only through errors that every rank raises at the same point (a cancel, an invalid request). Any other
error on one rank (out of memory, say) leaves the others waiting in a collective, so the rank exits instead
(rank 0 after the client has its error) and the launcher stops the pod, which restarts.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import grpc
import torch
import torch.distributed as dist

from smartdiff.denoiser.v1 import denoiser_pb2 as pb
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import Cancelled, RequestError, ServiceError
from smartdiff.shared.memory import is_out_of_memory, oom_detail
from smartdiff.shared.request import ResolvedRequest

from .engine import DenoiserEngine
from .parallel import ParallelConfig, ParallelState
from .server import DenoiseJob, DenoiserOptions, JobResult, prepare_job, run_job

log = logging.getLogger(__name__)

OP_SHUTDOWN, OP_DENOISE = 0, 1
HEADER = 6  # op, params bytes, prompt L, prompt C, negative L (0: none), negative C
JOB_TIMEOUT = timedelta(minutes=10)  # a job's collective that waits longer than this fails (a rank is gone)
IDLE_TIMEOUT = timedelta(days=365)  # the wait for the next job's header
LOCKSTEP_ERRORS = (Cancelled, RequestError)  # raised by every rank at the same check: the ranks stay in step
EXIT_DELAY = 1.0  # seconds rank 0 gives the client's error to go out before it exits


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "ProcessInfo":
        """What the launcher (launch.py or torchrun) tells each process; a single process when there is none."""
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", str(rank))))


def init_distributed(proc: ProcessInfo, options: DenoiserOptions, model: ModelConfig,
                     device: torch.device) -> tuple[ParallelState, torch.device]:
    """Validate the layout (before any process group exists), then join the group: NCCL on GPUs, gloo on CPUs
    (and the gloo group of the job headers: `header_group`)."""
    config = ParallelConfig(options.cfg_degree, options.ulysses_degree, options.ring_degree)
    config.validate(proc.world_size, model.dit.num_heads)
    if device.type == "cuda":
        device = torch.device("cuda", proc.local_rank)
        torch.cuda.set_device(device)
    if proc.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=proc.rank, world_size=proc.world_size, timeout=JOB_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return ParallelState(config, proc.rank), device


def header_group():
    """The group the job headers travel on (every rank creates it, in the same order): gloo, whose wait has no
    watchdog, with IDLE_TIMEOUT."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def exit_out_of_step(rank: int, error: BaseException) -> None:
    """A rank whose job failed where the others did not: they wait for it in a collective, so the pod cannot go
    on. Exit (code 1); the launcher stops the other ranks and the pod restarts."""
    log.critical("rank %d: a job failed here (%s: %s), and the ranks are out of step; exiting so that the pod "
                 "restarts", rank, type(error).__name__, error)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(1)


class LockstepStop:
    """The `cancelled` callable of one job on every rank (run_job polls it between DiT blocks too): True on all
    ranks at the same check (every rank makes the same checks in the same order: one before each step, one
    between two blocks). Each check is a broadcast, so the ranks meet there; the checks cost 0.1% (ulysses2) to
    0.4% (cfg2) of a Wan2.1-14B 480p step on H100 x2 (docs/benchmarks.md)."""

    def __init__(self, device: torch.device, local_stop=None):
        self.device = device
        self.local_stop = local_stop  # rank 0 only: the real cancel / deadline check
        self._pending = False  # a flag was broadcast at the previous call
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        cuda = device.type == "cuda"
        self._host = torch.zeros(1, dtype=torch.int32, pin_memory=True) if cuda else self._flag
        self._event = torch.cuda.Event() if cuda else None

    def __call__(self) -> bool:
        stop = self._read_previous()
        self._flag.fill_(1 if (self.local_stop is not None and self.local_stop()) else 0)
        if self._event is not None:
            work = dist.broadcast(self._flag, 0, async_op=True)
            work.wait()  # a stream dependency, not a host wait
            self._host.copy_(self._flag, non_blocking=True)
            self._event.record()
        else:
            dist.broadcast(self._flag, 0)
        self._pending = True
        return stop

    def _read_previous(self) -> bool:
        if not self._pending:
            return False
        if self._event is not None:
            self._event.synchronize()  # the flag was queued a step ago: this waits for that point, not this step
        return bool(self._host.item())


class RequestChannel:
    """Rank 0 -> every rank: one job's header (on `headers`, a gloo group: CPU tensors), then its params and
    embeddings (on the default group)."""

    def __init__(self, device: torch.device, headers=None):
        self.device = device  # NCCL needs device tensors; gloo CPU ones
        self.headers = headers  # None: the default group (gloo on CPUs)

    def _header_device(self) -> torch.device:
        return torch.device("cpu") if self.headers is not None else self.device

    def send(self, params: pb.DenoiseParams, prompt: torch.Tensor, negative: torch.Tensor | None):
        blob = params.SerializeToString()
        neg_shape = tuple(negative.shape) if negative is not None else (0, 0)
        header = torch.tensor([OP_DENOISE, len(blob), *prompt.shape, *neg_shape], dtype=torch.int64)
        dist.broadcast(header.to(self._header_device()), 0, group=self.headers)
        dist.broadcast(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device), 0)
        prompt = prompt.float().to(self.device).contiguous()
        dist.broadcast(prompt, 0)
        if negative is not None:
            negative = negative.float().to(self.device).contiguous()
            dist.broadcast(negative, 0)
        return prompt, negative

    def send_shutdown(self) -> None:
        dist.broadcast(torch.tensor([OP_SHUTDOWN] + [0] * (HEADER - 1), dtype=torch.int64,
                                    device=self._header_device()), 0, group=self.headers)

    def receive(self) -> tuple[pb.DenoiseParams, torch.Tensor, torch.Tensor | None] | None:
        header = torch.empty(HEADER, dtype=torch.int64, device=self._header_device())
        dist.broadcast(header, 0, group=self.headers)
        op, nbytes, pl, pc, nl, nc = header.tolist()
        if op == OP_SHUTDOWN:
            return None
        blob = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dist.broadcast(blob, 0)
        params = pb.DenoiseParams.FromString(blob.cpu().numpy().tobytes())
        prompt = torch.empty(pl, pc, dtype=torch.float32, device=self.device)
        dist.broadcast(prompt, 0)
        negative = None
        if nl:
            negative = torch.empty(nl, nc, dtype=torch.float32, device=self.device)
            dist.broadcast(negative, 0)
        return params, prompt, negative


def sum_cache_counts(engine: DenoiserEngine, result: JobResult, device: torch.device | str,
                     request: ResolvedRequest) -> None:
    """Under CFG parallel each rank ran one guidance branch, so its cache counts are its branch's only: every rank
    adds them up (a collective: all ranks call it after each job that ended well), so that the summary's
    cached_steps and cache_report count every branch, as one process does. A step without guidance (its expert's
    guidance <= 1, or no CFG at all) runs the conditional branch on both CFG ranks: the second rank's counts of
    those steps are left out. The sequence-parallel ranks of a branch share its decisions and counts. Nothing to
    do without CFG parallel."""
    from .cache.session import KINDS

    config = engine.parallel.config if engine.parallel is not None else ParallelConfig()
    if config.cfg == 1:
        return
    stats = result.cache
    computed, reused = Counter(stats.computed), Counter(stats.reused)
    if engine.parallel.cfg_rank == 1:  # the steps this rank ran as a copy of branch 0
        for step in stats.steps:
            if not request.uses_cfg or request.guidance[step.expert] <= 1.0:
                computed.subtract(step.computed)
                reused.subtract(step.reused)
    counts = torch.tensor([computed[k] for k in KINDS] + [reused[k] for k in KINDS], dtype=torch.int64,
                          device=device)
    dist.all_reduce(counts)
    totals = (counts // (config.world_size // config.cfg)).tolist()
    for i, kind in enumerate(KINDS):
        stats.computed[kind], stats.reused[kind] = totals[i], totals[len(KINDS) + i]


class RankZeroRunner:
    """Rank 0's job runner (DenoiserServicer.runner): broadcast the job, then run it in lockstep. One message
    at a time on the channel: shutdown waits for a running job (a cancelled one ends within a block or two), since
    its collectives and the shutdown message would otherwise cross (gloo aborts, NCCL hangs). A job that fails
    with an error the other ranks may not share leaves the pod out of step: the client gets UNAVAILABLE, later
    jobs too, and the process exits EXIT_DELAY later (exit_out_of_step)."""

    def __init__(self, engine: DenoiserEngine, channel: RequestChannel):
        self.engine, self.channel = engine, channel
        self._lock = threading.Lock()
        self._broken: str | None = None

    def __call__(self, job: DenoiseJob, prompt, negative, progress=None, cancelled=None) -> JobResult:
        with self._lock:
            if self._broken is not None:
                raise ServiceError(f"the denoiser pod is restarting: {self._broken}", grpc.StatusCode.UNAVAILABLE)
            try:
                prompt, negative = self.channel.send(job.params, prompt, negative if job.request.uses_cfg else None)
                stop = LockstepStop(self.channel.device, cancelled or (lambda: False))
                result = run_job(self.engine, job, prompt, negative, progress=progress, cancelled=stop)
                sum_cache_counts(self.engine, result, self.channel.device, job.request)
                return result
            except LOCKSTEP_ERRORS:
                raise
            except BaseException as e:  # noqa: BLE001 - the ranks are out of step whatever it was
                self._broken = f"rank 0 saw {type(e).__name__} in a job, and the ranks are out of step"
                timer = threading.Timer(EXIT_DELAY, exit_out_of_step, (0, e))
                timer.daemon = True  # (a process that returns first, a failed warm-up, keeps its exit code)
                timer.start()
                if is_out_of_memory(e):  # the request's size, most likely: a retry would restart the pod again
                    raise ServiceError(f"denoiser: out of device memory for this request ({oom_detail(e)}); the pod "
                                       "restarts: retry with a smaller size", grpc.StatusCode.RESOURCE_EXHAUSTED) from e
                raise ServiceError(f"the denoiser pod is restarting: {self._broken}; retry",
                                   grpc.StatusCode.UNAVAILABLE) from e

    def shutdown(self) -> None:
        with self._lock:
            if self._broken is None:  # (out of step: the others may not be listening; the launcher stops them)
                self.channel.send_shutdown()


def worker_loop(engine: DenoiserEngine, model: ModelConfig, options: DenoiserOptions, channel: RequestChannel) -> None:
    """Ranks > 0: run every job rank 0 sends until it sends shutdown. The errors every rank raises alike
    (LOCKSTEP_ERRORS) are rank 0's to report; any other exits this process (exit_out_of_step)."""
    while (msg := channel.receive()) is not None:
        params, prompt, negative = msg
        try:
            job = prepare_job(params, model, options, engine)
            result = run_job(engine, job, prompt, negative, cancelled=LockstepStop(channel.device))
            sum_cache_counts(engine, result, channel.device, job.request)
        except LOCKSTEP_ERRORS as e:  # rank 0 raised the same at the same check and reports it to the client
            log.info("rank job ended: %s", e)
        except BaseException as e:  # noqa: BLE001 - rank 0 waits for this rank in a collective
            exit_out_of_step(dist.get_rank(), e)
