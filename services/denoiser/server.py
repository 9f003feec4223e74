"""DenoiserService: params + text embeddings in, progress per step and the final latents out."""

from __future__ import annotations

import time

import torch

from smartdiff.denoiser.v1 import denoiser_pb2 as pb
from smartdiff.denoiser.v1 import denoiser_pb2_grpc as pb_grpc
from smartdiff.denoiser.v1 import options_pb2
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import Cancelled, DeadlineExceeded, RequestError, grpc_errors
from smartdiff.shared.request import SAMPLER_NAMES, GenerationRequest, ResolvedRequest, resolve_request
from smartdiff.shared.tensor_stream import TensorAssembler, tensor_to_messages
from smartdiff.shared.worker import Done, StageWorker

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DenoiserService"].full_name
EXACT_ATTENTION = "sdpa"


def request_from_params(p: pb.DenoiseParams) -> GenerationRequest:
    """The sampling fields of DenoiseParams as a GenerationRequest (unset optionals -> model defaults)."""
    return GenerationRequest(
        prompt="(embedded)", width=p.width if p.HasField("width") else None,
        height=p.height if p.HasField("height") else None, frames=p.frames if p.HasField("frames") else None,
        steps=p.steps if p.HasField("steps") else None, guidance=tuple(p.guidance) or None,
        shift=p.shift if p.HasField("shift") else None, sampler=p.sampler or None,
        seed=p.seed if p.HasField("seed") else None,
    )


def effective_params(p: pb.DenoiseParams, req: ResolvedRequest, model: ModelConfig) -> pb.DenoiseParams:
    out = pb.DenoiseParams()
    out.CopyFrom(p)
    out.model = model.name
    out.width, out.height, out.frames, out.steps = req.width, req.height, req.frames, req.steps
    del out.guidance[:]
    out.guidance.extend(req.guidance)
    out.shift, out.sampler, out.seed = req.shift, req.sampler, req.seed
    if not out.attention.backend:
        out.attention.backend = EXACT_ATTENTION
    if not out.cache.strategy:
        out.cache.strategy = "none"
    return out


class DenoiserServicer(pb_grpc.DenoiserServiceServicer):
    def __init__(self, model: ModelConfig, engine: DenoiserEngine, worker: StageWorker):
        self.model = model
        self.engine = engine
        self.worker = worker

    def validate(self, p: pb.DenoiseParams) -> ResolvedRequest:
        if p.model and p.model != self.model.name:
            raise RequestError("params.model", f"this deployment serves {self.model.name!r}, not {p.model!r}")
        if p.attention.backend not in ("", EXACT_ATTENTION):
            raise RequestError("attention.backend", f"{p.attention.backend!r} is not offered by this deployment; "
                                                    f"available: {EXACT_ATTENTION}")
        if p.cache.strategy not in ("", "none"):
            raise RequestError("cache.strategy", f"{p.cache.strategy!r} is not offered by this deployment; "
                                                 "available: none")
        return resolve_request(request_from_params(p), self.model)

    async def read_inputs(self, request_iterator) -> tuple[pb.DenoiseParams, torch.Tensor, torch.Tensor | None]:
        """params first, then the prompt embedding, then (for guidance > 1) the negative one."""
        params = None
        limit = self.model.dit.text_len * self.model.dit.text_dim * 4
        tensors = {"prompt_embeds": TensorAssembler("prompt_embeds", limit),
                   "negative_prompt_embeds": TensorAssembler("negative_prompt_embeds", limit)}
        async for msg in request_iterator:
            kind = msg.WhichOneof("frame")
            if kind == "params":
                if params is not None:
                    raise RequestError("params", "must be sent once")
                params = msg.params
            elif kind in tensors:
                if params is None:
                    raise RequestError("params", "must be the first message of the stream")
                tensors[kind].feed(getattr(msg, kind))
            else:
                raise RequestError("frame", "empty DenoiseRequest message")
        if params is None:
            raise RequestError("params", "missing: the stream ended without DenoiseParams")
        context = tensors["prompt_embeds"].result()
        negative = tensors["negative_prompt_embeds"].result() if tensors["negative_prompt_embeds"].started else None
        return params, context, negative

    def check_embedding(self, name: str, t: torch.Tensor) -> None:
        dit = self.model.dit
        if t.dim() != 2 or t.shape[1] != dit.text_dim or not 1 <= t.shape[0] <= dit.text_len:
            raise RequestError(name, f"must be [L, {dit.text_dim}] with 1 <= L <= {dit.text_len}, got {list(t.shape)}")
        if not t.is_floating_point():
            raise RequestError(name, f"must be a floating-point tensor, got {t.dtype}")

    @grpc_errors
    async def Denoise(self, request_iterator, context):
        params, prompt, negative = await self.read_inputs(request_iterator)
        req = self.validate(params)
        self.check_embedding("prompt_embeds", prompt)
        if req.uses_cfg:
            if negative is None:
                raise RequestError("negative_prompt_embeds", "required when guidance > 1")
            self.check_embedding("negative_prompt_embeds", negative)
        left = context.time_remaining()
        deadline = time.monotonic() + left if left is not None else None
        start = time.perf_counter()

        def job(emit, should_stop):
            return self.engine.denoise(req, prompt, negative if req.uses_cfg else None,
                                       progress=lambda i, n: emit((i, n)), cancelled=should_stop)

        latents = None
        try:
            async for item in self.worker.stream(job, deadline):
                if isinstance(item, Done):
                    latents = item.value
                else:
                    yield pb.DenoiseResponse(progress=pb.DenoiseProgress(
                        step=item[0], total_steps=item[1], elapsed_seconds=time.perf_counter() - start))
        except Cancelled:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"deadline exceeded during denoising ({req.steps} steps)") from None
            raise
        seconds = time.perf_counter() - start
        for msg in tensor_to_messages(latents.float().cpu().contiguous(), pb.DenoiseResponse, "latents"):
            yield msg
        yield pb.DenoiseResponse(summary=pb.DenoiseSummary(
            effective=effective_params(params, req, self.model), attention_selection=EXACT_ATTENTION,
            cached_steps=0, denoise_seconds=seconds, world_size=1,
        ))

    @grpc_errors
    async def GetCapabilities(self, request, context):
        return pb.GetCapabilitiesResponse(
            models=[self.model.name], samplers=list(SAMPLER_NAMES), default_attention_backend=EXACT_ATTENTION,
            attention_backends=[options_pb2.AttentionBackendInfo(
                name=EXACT_ATTENTION, available=True, lossy=False, dtypes=["float32", "bfloat16", "float16"],
                description="PyTorch scaled_dot_product_attention (exact)")],
            cache_strategies=[options_pb2.CacheStrategyInfo(name="none", available=True, description="no reuse")],
            world_size=1,
        )




async def start(model: ModelConfig, layout, system, address: str):
    """Load the DiT expert(s), warm up with a one-step tiny generation, serve on `address`."""
    from smartdiff.shared.serving import start_stage

    engine = DenoiserEngine.load(model, layout, system.device, system.dtype)
    servicer = DenoiserServicer(model, engine, StageWorker("denoiser", system.max_queue))

    def warmup():
        req = resolve_request(GenerationRequest(prompt="warm-up", width=32, height=32, frames=1, steps=1,
                                                guidance=(model.defaults.guidance[0],), seed=0), model)
        emb = torch.zeros(4, model.dit.text_dim)
        engine.denoise(req, emb, emb)

    return await start_stage(SERVICE_NAME, pb_grpc.add_DenoiserServiceServicer_to_server, servicer, address,
                             system.max_queue, warmup=warmup)
