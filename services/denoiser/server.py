"""DenoiserService: params + text embeddings in, progress per step and the final latents out."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field, replace

import torch

from smartdiff.denoiser.v1 import denoiser_pb2 as pb
from smartdiff.denoiser.v1 import denoiser_pb2_grpc as pb_grpc
from smartdiff.denoiser.v1 import options_pb2
from smartdiff.services.denoiser.attention import (EXACT, AttentionChoice, AttentionReport, available_backends,
                                                   default_backend)
from smartdiff.services.denoiser.attention import resolve as resolve_attention
from smartdiff.services.denoiser.attention import ring_refusal
from smartdiff.services.denoiser.attention.base import DTYPE_NAMES
from smartdiff.services.denoiser.cache import CacheConfig, CacheStats, cache_config_from_proto, cache_config_to_proto
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.fp8 import GEMMS
from smartdiff.shared.config import ConfigError, ModelConfig
from smartdiff.shared.errors import RequestError, ServiceError, grpc_errors
from smartdiff.shared.memory import measure_peak
from smartdiff.shared.request import SAMPLER_NAMES, ResolvedRequest, request_from_message, resolve_request
from smartdiff.shared.tensor_stream import TensorAssembler, read_params_and_tensors, tensor_to_messages
from smartdiff.shared.worker import Done, StageWorker

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DenoiserService"].full_name
log = logging.getLogger("smartdiff.denoiser")


@dataclass(frozen=True)
class DenoiserOptions:
    """System parameters of the denoiser deployment."""

    attention_backends: tuple[str, ...] | None = None  # allowed per request; None: every registered backend
    default_attention: str | None = None  # None: the fastest exact backend of the device (default_attention())
    enable_flexcache: bool = False
    cache_calibration: str | None = None  # YAML from `smartdiff calibrate-cache` (Wan2.2 TeaCache needs one)
    compile: str = "auto"  # torch.compile of the DiT's elementwise regions: auto (on CUDA), on, off
    gemm: str = "exact"  # the blocks' GEMMs: exact (in the model dtype) or fp8 (lossy, services/denoiser/fp8.py)
    cfg_batch: str = "auto"  # on: both guidance branches in one batch-2 forward; off: one after the other (less
    # memory); auto: off at low-mem level 3 (no slower there), else on
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1

    def batches_cfg(self, low_mem_level: int) -> bool:
        """Whether a guidance step runs its two branches as one batch-2 forward at this low-memory level."""
        return self.cfg_batch == "on" or (self.cfg_batch == "auto" and low_mem_level < 3)

    @property
    def world_size(self) -> int:
        """The pod's GPUs (processes): cfg x ulysses x ring."""
        return self.cfg_degree * self.ulysses_degree * self.ring_degree


def add_denoiser_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention-backends", help="comma-separated backends requests may choose (default: all)")
    p.add_argument("--default-attention", help="backend of requests that name none (default: the fastest exact one "
                                                "here: flash_attn on CUDA, which runs our kernel on Hopper; else sdpa)")
    p.add_argument("--enable-flexcache", action="store_true", help="allow per-request feature-reuse caches")
    p.add_argument("--cache-calibration", help="cache coefficients fitted by `smartdiff calibrate-cache` (YAML)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="fuse the DiT's norms / modulation / RoPE with torch.compile at warm-up (auto: on CUDA)")
    p.add_argument("--gemm", choices=GEMMS, default="exact",
                   help="the DiT blocks' GEMMs: exact (in --dtype, default) or fp8 (LOSSY: FP8 weights and "
                        "activations, row-wise scales; CUDA compute capability >= 8.9 with bfloat16, or a CPU "
                        "whose torch._scaled_mm takes row-wise scales; refused at start where it cannot run)")
    p.add_argument("--cfg-batch", choices=("auto", "on", "off"), default="auto",
                   help="on: both guidance branches of a step in one batch-2 forward; off: one after the other, "
                        "about half the activation memory (with --cfg-degree 1); auto (default): off at "
                        "--low-mem-level 3, where it is no slower, else on")
    p.add_argument("--cfg-degree", type=int, default=1, help="1 or 2: guidance branches on different ranks")
    p.add_argument("--ulysses-degree", type=int, default=1, help="all-to-all over heads (divides the head count)")
    p.add_argument("--ring-degree", type=int, default=1, help="sequence blocks passed around a ring")


def options_from_args(args: argparse.Namespace) -> DenoiserOptions:
    allowed = getattr(args, "attention_backends", None)
    return DenoiserOptions(
        attention_backends=tuple(a.strip() for a in allowed.split(",") if a.strip()) if allowed else None,
        default_attention=getattr(args, "default_attention", None),
        enable_flexcache=getattr(args, "enable_flexcache", False),
        cache_calibration=getattr(args, "cache_calibration", None), compile=getattr(args, "compile", "auto"),
        gemm=getattr(args, "gemm", "exact"), cfg_batch=getattr(args, "cfg_batch", "auto"),
        cfg_degree=getattr(args, "cfg_degree", 1), ulysses_degree=getattr(args, "ulysses_degree", 1),
        ring_degree=getattr(args, "ring_degree", 1),
    )


def engine_options(options: DenoiserOptions, model: ModelConfig, low_mem_level: int = 0) -> dict:
    """DenoiserEngine keyword arguments from the deployment's options, for `model` at `low_mem_level`."""
    calibration = load_calibration(options, model) if options.cache_calibration else None
    return dict(enable_flexcache=options.enable_flexcache, cache_calibration=calibration, gemm=options.gemm,
                batch_cfg=options.batches_cfg(low_mem_level))


def load_calibration(options: DenoiserOptions, model: ModelConfig):
    """The --cache-calibration file, read and checked against `model`: ConfigError naming the flag and the fault."""
    from smartdiff.services.denoiser.cache import CacheCalibration

    flag = f"--cache-calibration {options.cache_calibration}"
    if not options.enable_flexcache:
        raise ConfigError(f"{flag}: needs --enable-flexcache (the calibration is for the caches it enables)")
    try:
        calibration = CacheCalibration.from_yaml(Path(options.cache_calibration))
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if calibration.model != model.name:
        raise ConfigError(f"{flag}: fitted for {calibration.model!r}, this denoiser serves {model.name!r}")
    if calibration.teacache and len(calibration.teacache) != model.num_experts:  # (a file edited by hand)
        raise ConfigError(f"{flag}: TeaCache coefficients for {len(calibration.teacache)} experts, "
                          f"{model.name} has {model.num_experts}")
    return calibration


def load_engine(model: ModelConfig, layout, system, options: DenoiserOptions, device=None, parallel=None):
    """The denoiser engine of this process, at the deployment's low-memory level, compiled if asked."""
    engine = DenoiserEngine.load(model, layout, device or system.device, system.dtype, parallel=parallel,
                                 low_mem_level=system.low_mem_level,
                                 **engine_options(options, model, system.low_mem_level))
    if compile_enabled(options, engine.device):
        for dit in engine.experts:
            dit.set_compiled(True)
    if engine.gemm != "exact":
        log.info("DiT blocks' GEMMs: %s (lossy; --gemm exact for the model dtype)", engine.gemm)
    return engine


def compile_enabled(options: DenoiserOptions, device: torch.device) -> bool:
    return options.compile == "on" or (options.compile == "auto" and torch.device(device).type == "cuda")


@dataclass(frozen=True)
class DenoiseJob:
    """One validated request, as every rank runs it."""

    params: pb.DenoiseParams  # as received, with the seed fixed
    request: ResolvedRequest
    attention: AttentionChoice
    cache: CacheConfig
    attention_note: str = ""  # why the deployment replaced the requested backend (allow_fallback), for the summary


@dataclass
class JobResult:
    latents: torch.Tensor
    attention: AttentionReport | None = None
    cache: CacheStats = field(default_factory=CacheStats)
    peak_memory_bytes: int = 0


def check_options(options: DenoiserOptions, model: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The attention and guidance flags of a deployment on `device` / `dtype`, before it serves (on every rank of
    a pod, before they meet): ConfigError naming the flag."""
    from types import SimpleNamespace

    from smartdiff.services.denoiser.attention import backend_names

    if options.cfg_batch == "off" and options.cfg_degree == 2:
        raise ConfigError("--cfg-batch off: with --cfg-degree 2 each rank already runs one guidance branch; "
                          "leave --cfg-batch at auto or on")
    known = backend_names()
    for name in options.attention_backends or ():
        if name not in known:
            raise ConfigError(f"--attention-backends: unknown backend {name!r}; known: {', '.join(known)}")
    if options.default_attention:
        try:
            engine = SimpleNamespace(device=torch.device(device), dtype=dtype)  # what prepare_job reads of one
            prepare_job(pb.DenoiseParams(), model, options, engine)  # a request that names no backend
        except RequestError as e:
            raise ConfigError(f"--default-attention {options.default_attention}: {e.message}") from None


def default_attention(options: DenoiserOptions, model: ModelConfig, engine: DenoiserEngine | None = None) -> str:
    """The backend of requests that name none: the deployment's --default-attention, else the fastest exact one on
    the engine's device (attention.default_backend; the same on every rank of a pod), else (no engine) sdpa."""
    if options.default_attention:
        return options.default_attention
    if engine is None:
        return EXACT
    return default_backend(engine.device, engine.dtype, model.dit.head_dim, options.attention_backends)


def prepare_job(params: pb.DenoiseParams, model: ModelConfig, options: DenoiserOptions,
                engine: DenoiserEngine | None = None) -> DenoiseJob:
    """Validate everything of a request (RequestError naming the field) before any work.

    With `engine`, the attention choice is also checked against what can run on its device and dtype.
    """
    if params.model and params.model != model.name:
        raise RequestError("params.model", f"this deployment serves {model.name!r}, not {params.model!r}")
    req = resolve_request(request_from_message(params, prompt="(embedded)"), model)
    choice = AttentionChoice.from_proto(params.attention if params.HasField("attention") else None,
                                        default_backend=default_attention(options, model, engine))
    allowed = options.attention_backends
    note = ""
    if allowed is not None:
        if choice.backend not in allowed and choice.backend != EXACT:
            if not choice.allow_fallback:
                raise RequestError("attention.backend", f"{choice.backend!r} is not allowed by this deployment; "
                                                        f"allowed: {', '.join(sorted({*allowed, EXACT}))} "
                                                        f"(or set allow_fallback to run {EXACT} instead)")
            note = f"fallback from {choice.backend}: not allowed by this deployment"
            choice = replace(choice, backend=EXACT)
        if choice.backend == "auto":
            refused = [c for c in choice.candidates if c not in allowed and c != EXACT]
            if refused:
                raise RequestError("attention.auto.candidates", f"{', '.join(map(repr, refused))} not allowed by this "
                                   f"deployment; allowed: {', '.join(sorted({*allowed, EXACT} - {'auto'}))}")
            candidates = choice.candidates or tuple(a for a in allowed if a not in ("auto", EXACT))
            candidates = tuple(c for c in candidates if c in allowed)
            if candidates:
                choice = replace(choice, candidates=candidates)
            else:  # nothing allowed to try: the exact backend (an empty candidate list would mean "all")
                note = "auto: no candidate allowed by this deployment"
                choice = replace(choice, backend=EXACT)
    if (refusal := ring_refusal(choice.backend, options.ring_degree)) is not None:  # before any work
        if not choice.allow_fallback:
            raise RequestError(refusal.field, f"{refusal.rule} (or set allow_fallback to run {EXACT} instead)")
        note = f"fallback from {choice.backend}: {refusal.rule}"
        choice = replace(choice, backend=EXACT)
    if engine is not None:
        resolve_attention(choice, engine.device, engine.dtype, model.dit.head_dim, allowed)
    cache = cache_config_from_proto(params.cache)
    fixed = pb.DenoiseParams()
    fixed.CopyFrom(params)
    fixed.seed = req.seed  # every rank must draw the same noise
    return DenoiseJob(fixed, req, choice, cache, note)


def run_job(engine: DenoiserEngine, job: DenoiseJob, prompt: torch.Tensor, negative: torch.Tensor | None,
            progress=None, cancelled=None) -> JobResult:
    """One job on `engine`. `cancelled` (the worker's check in one process, a LockstepStop on every rank of a
    multi-GPU pod) is polled before each step and between DiT blocks: a cancel stops the job within a block or two."""
    result = JobResult(latents=None)

    def on_attention(report: AttentionReport) -> None:
        result.attention = report

    def on_step(i: int, n: int, t: float, expert: int) -> None:  # progress(step, total, timestep, expert, cache hit)
        progress((i, n, t, expert, result.cache.last_step_hit))

    with measure_peak(engine.device) as peak:
        latents = engine.denoise(job.request, prompt, negative if job.request.uses_cfg else None,
                                 progress=on_step if progress else None, cancelled=cancelled, cache=job.cache,
                                 cache_stats=result.cache, attention=job.attention, on_attention=on_attention,
                                 interrupt=cancelled)
        # to the host here: the GPU may still be a step behind the CPU, and that work is the denoiser's time
        result.latents = latents.float().cpu()
    result.peak_memory_bytes = peak.bytes or 0
    return result


def effective_attention(job: DenoiseJob, result: JobResult) -> options_pb2.AttentionConfig:
    """The attention as run: the backend that ran, and only the parameters that applied, defaults filled in
    (auto's when auto chose, sparge's when sparge ran; a request may set both, and the others ignore them)."""
    choice = job.attention  # after any fallback
    out = options_pb2.AttentionConfig(backend=result.attention.backend if result.attention else choice.backend,
                                      allow_fallback=choice.allow_fallback)
    if choice.backend == "auto":
        out.auto.tolerance = choice.tolerance
        out.auto.candidates.extend(choice.candidates)
    if out.backend == "sparge":
        sparge = choice.sparge.resolved()
        for name in ("topk", "cdf_threshold", "sim_threshold", "pv_threshold"):
            if getattr(sparge, name) is not None:
                setattr(out.sparge, name, getattr(sparge, name))
    return out


def effective_params(job: DenoiseJob, result: JobResult, model: ModelConfig) -> pb.DenoiseParams:
    req = job.request
    out = pb.DenoiseParams(request_id=job.params.request_id, model=model.name, width=req.width, height=req.height,
                           frames=req.frames, steps=req.steps, guidance=list(req.guidance), shift=req.shift,
                           sampler=req.sampler, seed=req.seed)
    out.attention.CopyFrom(effective_attention(job, result))
    out.cache.CopyFrom(cache_config_to_proto(result.cache.applied or job.cache))
    return out


def attention_selection(job: DenoiseJob, result: JobResult) -> str:
    """What ran and how it was chosen, with the reason when the deployment replaced the requested backend."""
    text = result.attention.selection if result.attention else EXACT
    return f"{text} ({job.attention_note})" if job.attention_note else text


class DenoiserServicer(pb_grpc.DenoiserServiceServicer):
    """`runner(job, prompt, negative, progress, cancelled) -> JobResult` runs a job: in this process by default,
    or, on rank 0 of a multi-GPU pod, on every rank together (services/denoiser/distributed.py)."""

    def __init__(self, model: ModelConfig, engine: DenoiserEngine, worker: StageWorker,
                 options: DenoiserOptions = DenoiserOptions(), runner=None):
        self.model = model
        self.engine = engine
        self.worker = worker
        self.options = options
        self.runner = runner or (lambda *a, **kw: run_job(engine, *a, **kw))

    async def read_inputs(self, request_iterator) -> tuple[pb.DenoiseParams, torch.Tensor, torch.Tensor | None]:
        """params first, then the prompt embedding, then (for guidance > 1) the negative one."""
        limit = self.model.dit.text_len * self.model.dit.text_dim * 4
        tensors = {"prompt_embeds": TensorAssembler("prompt_embeds", limit),
                   "negative_prompt_embeds": TensorAssembler("negative_prompt_embeds", limit)}
        params = await read_params_and_tensors(request_iterator, tensors)
        context = tensors["prompt_embeds"].result()
        negative = tensors["negative_prompt_embeds"].result() if tensors["negative_prompt_embeds"].started else None
        return params, context, negative

    def check_embedding(self, name: str, t: torch.Tensor) -> None:
        dit = self.model.dit
        if t.dim() != 2 or t.shape[1] != dit.text_dim or not 1 <= t.shape[0] <= dit.text_len:
            raise RequestError(name, f"must be [L, {dit.text_dim}] with 1 <= L <= {dit.text_len}, got {list(t.shape)}")
        if not t.is_floating_point():
            raise RequestError(name, f"must be a floating-point tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise RequestError(name, "must be finite (it holds NaN or infinity)")

    @grpc_errors
    async def Denoise(self, request_iterator, context):
        params, prompt, negative = await self.read_inputs(request_iterator)
        job = prepare_job(params, self.model, self.options, self.engine)
        self.check_embedding("prompt_embeds", prompt)
        if negative is not None:  # checked even when unused (guidance 1): a malformed tensor is a client's bug
            self.check_embedding("negative_prompt_embeds", negative)
        elif job.request.uses_cfg:
            raise RequestError("negative_prompt_embeds", "required when guidance > 1")
        start = time.perf_counter()

        def job_fn(emit, should_stop):
            return self.runner(job, prompt, negative, progress=emit, cancelled=should_stop)

        result = None
        async for item in self.worker.stream(job_fn, context):
            if isinstance(item, Done):
                result = item.value
            else:
                step, total, t, expert, hit = item
                yield pb.DenoiseResponse(progress=pb.DenoiseProgress(
                    step=step, total_steps=total, timestep=t, expert=expert, cache_hit=hit,
                    elapsed_seconds=time.perf_counter() - start))
        seconds = time.perf_counter() - start
        if not torch.isfinite(result.latents).all():  # a numerical failure here, not the client's: never passed on
            ran = result.attention.kernel if result.attention else job.attention.backend
            raise ServiceError(f"the denoised latents are not finite (NaN or infinity) with attention {ran}; the "
                               "request's inputs were finite (an exact attention backend may avoid it)")
        for msg in tensor_to_messages(result.latents.float().cpu().contiguous(), pb.DenoiseResponse, "latents"):
            yield msg
        yield pb.DenoiseResponse(summary=pb.DenoiseSummary(
            effective=effective_params(job, result, self.model),
            attention_selection=attention_selection(job, result),
            cached_steps=result.cache.cached_steps, denoise_seconds=seconds,
            world_size=self.options.world_size,
            cache_report=result.cache.to_proto(), peak_memory_bytes=result.peak_memory_bytes,
            low_mem_level=int(self.engine.memory.level),
        ))

    @grpc_errors
    async def GetCapabilities(self, request, context):
        engine = self.engine
        allowed = self.options.attention_backends
        infos = []
        for status in available_backends(engine.device, engine.dtype, self.model.dit.head_dim):
            info = status.info
            reason = status.reason
            if reason is None and allowed is not None and info.name not in allowed and info.name != EXACT:
                reason = "not allowed by this deployment"
            infos.append(options_pb2.AttentionBackendInfo(
                name=info.name, available=reason is None, unavailable_reason=reason or "", lossy=info.lossy,
                dtypes=[DTYPE_NAMES.get(d, str(d)) for d in info.dtypes], description=info.description))
        return pb.GetCapabilitiesResponse(
            models=[self.model.name], samplers=list(SAMPLER_NAMES), attention_backends=infos,
            default_attention_backend=default_attention(self.options, self.model, engine),
            cache_strategies=engine.flexcache.strategy_infos(),
            world_size=self.options.world_size,
        )


def warmup_job(model: ModelConfig, options: DenoiserOptions, compiled: bool,
               engine: DenoiserEngine | None = None) -> DenoiseJob:
    """A one-step request run before SERVING, with the default attention of `engine`'s device: loads kernels and
    allocator pools; when compiled, at the model's default size, so that the usual request never waits for
    compilation."""
    d = model.defaults
    size = dict(width=d.width, height=d.height, frames=d.frames) if compiled else dict(width=32, height=32, frames=1)
    params = pb.DenoiseParams(steps=1, guidance=[d.guidance[0]], seed=0, **size)
    return prepare_job(params, model, options, engine)


def warm_attention(model: ModelConfig, options: DenoiserOptions, device: torch.device, dtype: torch.dtype) -> None:
    """Compile the attention kernels of every backend the deployment allows, at the model's default size,
    before SERVING (CUDA; not under ring attention, whose chunks are other shapes). On this process's GPU only:
    other ranks of a multi-GPU denoiser compile on their first request, or load what this one compiled from a
    Triton cache they share (the image's TRITON_CACHE_DIR=/cache/triton). A failure is logged, not fatal."""
    if device.type != "cuda" or options.ring_degree > 1:
        return
    from smartdiff.services.denoiser.attention.handle import warm_kernels

    tokens = warmup_job(model, options, compiled=True).request.tokens(model)  # at the default size
    start = time.perf_counter()
    try:
        warmed = warm_kernels(device, dtype, model.dit.head_dim, model.dit.num_heads // options.ulysses_degree,
                              tokens, options.attention_backends)
    except Exception as e:  # noqa: BLE001 - serving goes on; the first request compiles instead
        log.warning("attention kernels not warmed (%s: %s); the first requests will compile them",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return
    finally:
        torch.cuda.empty_cache()
    log.info("attention kernels warmed in %.1f s: %s", time.perf_counter() - start, ", ".join(warmed) or "none")


async def start(model: ModelConfig, layout, system, address: str, options: DenoiserOptions = DenoiserOptions(),
                engine: DenoiserEngine | None = None, runner=None):
    """Load the DiT expert(s) (unless `engine` is given), warm up (on every rank with `runner`), serve on `address`."""
    from smartdiff.shared.serving import start_stage

    if engine is None:
        engine = load_engine(model, layout, system, options)
    check_options(options, model, engine.device, engine.dtype)
    servicer = DenoiserServicer(model, engine, StageWorker("denoiser", system.max_queue, engine.device), options, runner)

    def warmup():
        emb = torch.zeros(4, model.dit.text_dim)
        servicer.runner(warmup_job(model, options, compile_enabled(options, engine.device), engine), emb, emb)
        warm_attention(model, options, engine.device, engine.dtype)

    return await start_stage(SERVICE_NAME, pb_grpc.add_DenoiserServiceServicer_to_server, servicer, address,
                             system.max_queue, warmup=warmup)
