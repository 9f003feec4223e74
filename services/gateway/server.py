"""GatewayService: validates a user request, runs text encoder -> denoiser -> vae, streams progress and the video."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from contextlib import contextmanager

import grpc

from smartdiff.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from smartdiff.gateway.v1 import gateway_pb2 as pb
from smartdiff.gateway.v1 import gateway_pb2_grpc as pb_grpc
from smartdiff.services.denoiser.attention.choice import AttentionChoice
from smartdiff.services.denoiser.cache.config import cache_config_from_proto
from smartdiff.shared import metrics
from smartdiff.shared.config import ConfigError, ModelConfig
from smartdiff.shared.errors import (
    DeadlineExceeded, Overloaded, RequestError, ServiceError, StageUnavailable, TensorStreamError, calling_stage,
    grpc_errors,
)
from smartdiff.shared.grpc_server import create_channel
from smartdiff.shared.request import (
    MAX_FRAMES, MAX_SIDE, MAX_STEPS, SAMPLER_NAMES, ResolvedRequest, reject_unknown_fields, request_from_message,
    resolve_request,
)
from smartdiff.shared.tensor_stream import frames_to_tensors, tensor_to_messages
from smartdiff.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from smartdiff.vae.v1 import vae_pb2, vae_pb2_grpc

log = logging.getLogger("smartdiff.gateway")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
STAGE_NAMES = {pb.STAGE_TEXT_ENCODER: "text_encoder", pb.STAGE_DENOISER: "denoiser", pb.STAGE_VAE: "vae"}
# How long a stage call waits for the stage to be reachable (a replica restarting, or one just replaced whose
# successor the channel has not looked up yet), within the request's deadline. The call itself is made once:
# one that fails after it was sent may have crashed its replica, and must not take down the next one.
STAGE_CONNECT_WAIT = 10.0
# The wait ends this long before the request's deadline, so that the client hears which stage is missing rather
# than its own DEADLINE_EXCEEDED.
DEADLINE_MARGIN = 0.5
# A stage with no usable replica for this long gets a fresh channel, which looks its name up at once (gRPC's
# own channel would wait up to 30 s, or minutes after failed lookups).
STAGE_RENEW_AFTER = 1.0
STAGE_SERVICES = {  # stage -> (stub, the service its health reports)
    "text_encoder": (text_encoder_pb2_grpc.TextEncoderServiceStub,
                     text_encoder_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name),
    "denoiser": (denoiser_pb2_grpc.DenoiserServiceStub,
                 denoiser_pb2.DESCRIPTOR.services_by_name["DenoiserService"].full_name),
    "vae": (vae_pb2_grpc.VaeServiceStub, vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name),
}


def stage_channel_options(service: str) -> list[tuple[str, str]]:
    """Round robin over every address the stage's name resolves to (headless Services in Kubernetes), skipping
    the replicas whose health says NOT_SERVING: warming up, or draining after SIGTERM. (create_channel adds the
    pings that fail a call to a frozen replica.)"""
    config = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": service}}
    return [("grpc.service_config", json.dumps(config))]


async def _ready(channel: grpc.aio.Channel, timeout: float) -> bool:
    if timeout > 0:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            pass
        except grpc.aio.UsageError:  # closed: another waiting request replaced it (reachable reads the new one)
            return False
    return channel.get_state() == grpc.ChannelConnectivity.READY


def progress(stage: int, step: int, total: int, start: float, message: str = "") -> pb.GenerateResponse:
    return pb.GenerateResponse(progress=pb.GenerateProgress(
        stage=stage, step=step, total_steps=total, elapsed_seconds=time.perf_counter() - start, message=message))


class StageClients:
    """Channels and stubs to the three stages."""

    text_encoder: text_encoder_pb2_grpc.TextEncoderServiceStub
    denoiser: denoiser_pb2_grpc.DenoiserServiceStub
    vae: vae_pb2_grpc.VaeServiceStub

    def __init__(self, text_encoder: str, denoiser: str, vae: str):
        self.addresses = {"text_encoder": text_encoder, "denoiser": denoiser, "vae": vae}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._renewed = dict.fromkeys(self.addresses, 0.0)
        self._retired: list[asyncio.Future] = []  # replaced channels, closing once their calls end
        for stage in self.addresses:
            self._connect(stage)

    def _connect(self, stage: str) -> None:
        stub, service = STAGE_SERVICES[stage]
        self._channels[stage] = create_channel(self.addresses[stage], options=stage_channel_options(service))
        setattr(self, stage, stub(self._channels[stage]))

    async def reachable(self, stage: str, left: float | None) -> None:
        """Return once `stage` has a replica that is connected and SERVING, waiting up to STAGE_CONNECT_WAIT
        seconds (less when the request's deadline, `left` seconds away, is nearer: DEADLINE_MARGIN before it) and
        looking the name up again every STAGE_RENEW_AFTER seconds meanwhile; StageUnavailable past that."""
        if self._channels[stage].get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"deadline exceeded before calling {stage}")
        loop = asyncio.get_running_loop()
        wait = STAGE_CONNECT_WAIT if left is None else max(0.0, min(STAGE_CONNECT_WAIT, left - DEADLINE_MARGIN))
        end = loop.time() + wait
        while True:
            if await _ready(self._channels[stage], min(STAGE_RENEW_AFTER, end - loop.time())):
                return
            if loop.time() >= end:
                raise StageUnavailable(stage, f"no replica at {self.addresses[stage]} connected and serving "
                                              f"within {wait:.1f} s")
            if loop.time() - self._renewed[stage] >= STAGE_RENEW_AFTER:  # once for all the requests waiting
                self._renewed[stage] = loop.time()
                log.info("%s: no usable replica; looking up %s again", stage, self.addresses[stage])
                self._retired = [c for c in self._retired if not c.done()]
                self._retired.append(asyncio.ensure_future(self._channels[stage].close(grace=24 * 3600.0)))
                self._connect(stage)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        for closing in self._retired:
            closing.cancel()


# Longest wait for a client to take the next message of its generation: one that stops reading would otherwise
# hold its slot (and its stage calls) for good. Generous: a message is at most ~1 MiB of video.
WRITE_STALL_SECONDS = 60.0
CAPABILITIES_SECONDS = 60.0  # how long the gateway uses the denoiser's answer before it asks again


@contextmanager
def ended(call):
    """A stage call, cancelled if the block is left before the call finished. Needed because the generation is an
    async generator: a client's cancel that comes while the gateway writes to it closes the generation at a
    `yield`, where nothing else ends the stage call (its job would run to the end and hold the stage's slot)."""
    try:
        yield call
    finally:
        call.cancel()  # no effect on a call that has ended


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(self, model: ModelConfig, stages: StageClients, max_in_flight: int = 8):
        self.model = model
        self.stages = stages
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._denoiser_caps: denoiser_pb2.GetCapabilitiesResponse | None = None
        self._denoiser_caps_at = 0.0

    async def denoiser_capabilities(self, timeout: float | None) -> denoiser_pb2.GetCapabilitiesResponse:
        """The denoiser's capabilities, asked again after CAPABILITIES_SECONDS (a rollout may have replaced it with
        one that allows other backends); the last answer while it cannot be reached."""
        if self._denoiser_caps is None:
            with calling_stage("denoiser"):
                await self.stages.reachable("denoiser", timeout)  # renews a channel left in its reconnect backoff
                self._denoiser_caps = await self.stages.denoiser.GetCapabilities(
                    denoiser_pb2.GetCapabilitiesRequest(), timeout=timeout)
            self._denoiser_caps_at = time.monotonic()
        elif time.monotonic() - self._denoiser_caps_at > CAPABILITIES_SECONDS:
            self._denoiser_caps_at = time.monotonic()  # (asked at most once per period, answered or not)
            try:  # no wait for a replica: the request's own stage calls wait, once
                self._denoiser_caps = await self.stages.denoiser.GetCapabilities(
                    denoiser_pb2.GetCapabilitiesRequest(), timeout=min(timeout or 2.0, 2.0))
            except grpc.RpcError as e:
                log.info("denoiser capabilities not renewed (%s); using the last answer", e.code())
        return self._denoiser_caps

    def denoise_detail(self, p: denoiser_pb2.DenoiseProgress) -> str:
        """The message of a denoiser step: the expert that ran it (two-expert models) and whether the cache reused
        earlier results, e.g. "expert low-noise, cache hit"."""
        parts = [f"expert {('high', 'low')[p.expert]}-noise"] if self.model.num_experts == 2 and p.expert < 2 else []
        return ", ".join(parts + (["cache hit"] if p.cache_hit else []))

    async def validate(self, r: pb.GenerateRequest, timeout: float | None) -> ResolvedRequest:
        reject_unknown_fields(r, "request")
        if r.model and r.model != self.model.name:
            raise RequestError("model", f"this deployment serves {self.model.name!r}, not {r.model!r}")
        req = resolve_request(request_from_message(r), self.model)
        caps = await self.denoiser_capabilities(timeout)
        backends = {b.name: b for b in caps.attention_backends}
        available = ", ".join(sorted(n for n, b in backends.items() if b.available))
        wanted = backends.get(r.attention.backend)
        if r.attention.backend and wanted is None:
            raise RequestError("attention.backend", f"unknown backend {r.attention.backend!r}; available: {available}")
        if wanted is not None and not wanted.available and not r.attention.allow_fallback:
            raise RequestError("attention.backend", f"{wanted.name!r} cannot run on this deployment: "
                                                    f"{wanted.unavailable_reason}; available: {available} "
                                                    "(or set allow_fallback)")
        strategies = {c.name for c in caps.cache_strategies if c.available}
        if r.cache.strategy and r.cache.strategy not in strategies:
            raise RequestError("cache.strategy", f"{r.cache.strategy!r} is not offered by this deployment; "
                                                 f"available: {', '.join(sorted(strategies))}")
        # their parameters' rules (ranges, NaN) too, before the text encoder runs; the denoiser checks them again
        if r.HasField("attention"):
            AttentionChoice.from_proto(r.attention)
        if r.HasField("cache"):
            cache_config_from_proto(r.cache)
        if r.output_format not in (0, vae_pb2.OUTPUT_FORMAT_MP4, vae_pb2.OUTPUT_FORMAT_FRAMES):
            raise RequestError("output_format", f"unknown value {r.output_format}")
        return req

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context):
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(f"gateway: {self.in_flight} generations in flight (limit {self.max_in_flight}); retry later")
        self.in_flight += 1
        generation = self._generate(request, context)
        try:
            async for msg in generation:
                try:  # a client that stops reading (stalled, or gone without closing) loses its generation
                    await asyncio.wait_for(context.write(msg), WRITE_STALL_SECONDS)
                except asyncio.TimeoutError:
                    log.warning("generation stopped: its client read nothing for %g s", WRITE_STALL_SECONDS)
                    raise DeadlineExceeded(f"gateway: the client read nothing for {WRITE_STALL_SECONDS:g} s; "
                                           "the generation was stopped") from None
                except Exception as e:  # grpc's failed send: the client cancelled, its deadline passed, it is gone
                    raise asyncio.CancelledError(f"the client's call ended: {e!r}") from e
        finally:
            await generation.aclose()  # its stage calls end with it
            self.in_flight -= 1

    async def _generate(self, request: pb.GenerateRequest, context):
        start = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        req = await self.validate(request, context.time_remaining())
        yield progress(pb.STAGE_QUEUED, 0, 1, start, f"request {request_id} accepted")
        for stage in self.stages.addresses:  # all three before any GPU work: a VAE that is gone fails it now
            await self.stages.reachable(stage, context.time_remaining())
        timings: list[pb.StageTiming] = []

        t0 = time.perf_counter()
        prompts = [req.prompt, req.negative_prompt] if req.uses_cfg else [req.prompt]
        with calling_stage("text_encoder"):
            await self.stages.reachable("text_encoder", context.time_remaining())  # it may have gone since
            frames, te_summary = [], None
            with ended(self.stages.text_encoder.Encode(text_encoder_pb2.EncodeRequest(
                    request_id=request_id, model=self.model.name, prompts=prompts),
                    timeout=context.time_remaining())) as call:
                async for msg in call:
                    if msg.WhichOneof("frame") == "embedding":
                        frames.append(msg.embedding)
                    else:
                        te_summary = msg.summary
            try:
                embeddings = list(frames_to_tensors(frames, "embedding"))
            except TensorStreamError as e:  # the stage's reply, not the client's request
                raise ServiceError(f"text_encoder: its embeddings are unusable: {e.message}") from None
        if len(embeddings) != len(prompts):
            raise ServiceError(f"text_encoder: returned {len(embeddings)} embeddings for {len(prompts)} prompts")
        timings.append(pb.StageTiming(stage=pb.STAGE_TEXT_ENCODER, seconds=time.perf_counter() - t0,
                                      compute_seconds=te_summary.encode_seconds if te_summary else 0.0,
                                      peak_memory_bytes=te_summary.peak_memory_bytes if te_summary else 0,
                                      low_mem_level=te_summary.low_mem_level if te_summary else 0))
        truncated = [("prompt", "negative_prompt")[i] for i in te_summary.truncated_prompts] if te_summary else []
        yield progress(pb.STAGE_TEXT_ENCODER, 1, 1, start,
                       f"cut to {self.model.text_encoder.text_len} tokens: {', '.join(truncated)}" if truncated else "")

        t0 = time.perf_counter()
        params = denoiser_pb2.DenoiseParams(
            request_id=request_id, model=self.model.name, width=req.width, height=req.height, frames=req.frames,
            steps=req.steps, guidance=list(req.guidance), shift=req.shift, sampler=req.sampler, seed=req.seed,
            attention=request.attention, cache=request.cache)

        def denoise_inputs():
            yield denoiser_pb2.DenoiseRequest(params=params)
            yield from tensor_to_messages(embeddings[0], denoiser_pb2.DenoiseRequest, "prompt_embeds")
            if req.uses_cfg:
                yield from tensor_to_messages(embeddings[1], denoiser_pb2.DenoiseRequest, "negative_prompt_embeds")

        latent_frames, dn_summary = [], None
        with calling_stage("denoiser"):
            await self.stages.reachable("denoiser", context.time_remaining())  # it may have gone since
            with ended(self.stages.denoiser.Denoise(denoise_inputs(), timeout=context.time_remaining())) as call:
                async for msg in call:
                    kind = msg.WhichOneof("frame")
                    if kind == "progress":
                        yield progress(pb.STAGE_DENOISER, msg.progress.step, msg.progress.total_steps, start,
                                       self.denoise_detail(msg.progress))
                    elif kind == "latents":
                        latent_frames.append(msg.latents)
                    else:
                        dn_summary = msg.summary
        timings.append(pb.StageTiming(stage=pb.STAGE_DENOISER, seconds=time.perf_counter() - t0,
                                      compute_seconds=dn_summary.denoise_seconds if dn_summary else 0.0,
                                      peak_memory_bytes=dn_summary.peak_memory_bytes if dn_summary else 0,
                                      low_mem_level=dn_summary.low_mem_level if dn_summary else 0))
        if request.return_latents:
            for f in latent_frames:
                yield pb.GenerateResponse(latents=f)

        t0 = time.perf_counter()
        output_format = request.output_format or vae_pb2.OUTPUT_FORMAT_MP4

        def decode_inputs():
            yield vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(
                request_id=request_id, model=self.model.name, output_format=output_format, fps=req.fps))
            for f in latent_frames:
                yield vae_pb2.DecodeRequest(latents=f)

        vae_summary = None
        with calling_stage("vae"):
            await self.stages.reachable("vae", context.time_remaining())  # it may have gone since
            with ended(self.stages.vae.Decode(decode_inputs(), timeout=context.time_remaining())) as call:
                async for msg in call:
                    kind = msg.WhichOneof("frame")
                    if kind == "progress":
                        stage = pb.STAGE_VIDEO_ENCODING if msg.progress.phase == vae_pb2.DECODE_PHASE_ENCODING \
                            else pb.STAGE_VAE
                        yield progress(stage, msg.progress.step, msg.progress.total, start)
                    elif kind == "mp4":
                        yield pb.GenerateResponse(mp4=msg.mp4)
                    elif kind == "frames":
                        yield pb.GenerateResponse(frames=msg.frames)
                    else:
                        vae_summary = msg.summary
        timings.append(pb.StageTiming(stage=pb.STAGE_VAE, seconds=time.perf_counter() - t0,
                                      compute_seconds=vae_summary.decode_seconds + vae_summary.encode_seconds
                                      if vae_summary else 0.0,
                                      peak_memory_bytes=vae_summary.peak_memory_bytes if vae_summary else 0,
                                      low_mem_level=vae_summary.low_mem_level if vae_summary else 0))
        effective = dn_summary.effective if dn_summary else params
        total = time.perf_counter() - start
        for timing in timings:
            metrics.STAGE_SECONDS.labels(STAGE_NAMES[timing.stage]).observe(timing.seconds)
        metrics.STAGE_SECONDS.labels("total").observe(total)
        yield pb.GenerateResponse(summary=pb.GenerateSummary(
            request_id=request_id, stage_timings=timings, total_seconds=total,
            video_bytes=vae_summary.video_bytes if vae_summary else 0,
            cached_steps=dn_summary.cached_steps if dn_summary else 0,
            cache_report=dn_summary.cache_report if dn_summary else None,
            denoiser_world_size=dn_summary.world_size if dn_summary else 0, truncated_prompts=truncated,
            settings=pb.EffectiveSettings(
                model=self.model.name, negative_prompt=req.negative_prompt, width=req.width, height=req.height,
                frames=req.frames, steps=req.steps, guidance=list(req.guidance), shift=req.shift,
                sampler=req.sampler, seed=req.seed, attention=effective.attention,
                attention_selection=dn_summary.attention_selection if dn_summary else "",
                cache=effective.cache, output_format=output_format, fps=vae_summary.fps if vae_summary else 0),
        ))

    @grpc_errors
    async def GetCapabilities(self, request, context):
        caps = await self.denoiser_capabilities(context.time_remaining())
        d = self.model.defaults
        return pb.GetCapabilitiesResponse(
            models=[pb.ModelInfo(
                name=self.model.name, description=self.model.description, num_experts=self.model.num_experts,
                defaults=pb.ModelDefaults(width=d.width, height=d.height, frames=d.frames, steps=d.steps,
                                          guidance=list(d.guidance), shift=d.shift, sampler=d.sampler,
                                          negative_prompt=d.negative_prompt, fps=d.fps))],
            default_model=self.model.name, samplers=list(SAMPLER_NAMES),
            attention_backends=caps.attention_backends, default_attention_backend=caps.default_attention_backend,
            cache_strategies=caps.cache_strategies,
            output_formats=[vae_pb2.OUTPUT_FORMAT_MP4, vae_pb2.OUTPUT_FORMAT_FRAMES],
            limits=pb.RequestLimits(max_width=MAX_SIDE, max_height=MAX_SIDE, max_frames=MAX_FRAMES, max_steps=MAX_STEPS),
        )



async def wait_for_denoiser(servicer: GatewayServicer, retry_seconds: float = 0.5, max_retry: float = 10.0,
                            attempt_seconds: float = 2.0) -> None:
    """Until the denoiser answers its capabilities (which every request needs), retrying with backoff: a gateway
    started before its stages (any order, on Kubernetes) stays NOT_SERVING meanwhile and logs why."""
    while True:
        try:
            caps = await servicer.denoiser_capabilities(timeout=attempt_seconds)
            if servicer.model.name not in caps.models:
                raise ConfigError(f"the denoiser at {servicer.stages.addresses['denoiser']} serves "
                                  f"{', '.join(caps.models)}, this gateway {servicer.model.name}: give the gateway "
                                  "the --model / --checkpoint of its stages")
            return
        except ServiceError as e:
            log.warning("gateway not ready: %s; retrying in %.1f s", e.message, retry_seconds)
        await asyncio.sleep(retry_seconds)
        retry_seconds = min(2 * retry_seconds, max_retry)


async def start(model: ModelConfig, stages: StageClients, address: str, max_queue: int = 8):
    """Serve the public API on `address`; SERVING once the denoiser answered its capabilities."""
    from smartdiff.shared.serving import start_stage

    servicer = GatewayServicer(model, stages, max_in_flight=max_queue)
    server, port = await start_stage(SERVICE_NAME, pb_grpc.add_GatewayServiceServicer_to_server, servicer,
                                     address, max_queue, warmup=functools.partial(wait_for_denoiser, servicer))
    return server, port
