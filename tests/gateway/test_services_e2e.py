"""The four services over loopback gRPC: results equal the in-process engines, errors map to status codes,
every service keeps serving after a bad request, cancellation stops the denoiser within one step."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smartdiff.denoiser.v1 import denoiser_pb2, options_pb2
from smartdiff.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smartdiff.services.gateway.client import generate, request_to_proto
from smartdiff.services.gateway.embedded import EmbeddedDeployment
from smartdiff.services.gateway.local import LocalPipeline
from smartdiff.services.vae.video import probe_mp4
from smartdiff.shared.config import load_model_config
from smartdiff.shared.grpc_server import create_channel
from smartdiff.shared.request import GenerationRequest, resolve_request
from smartdiff.shared.serving import SystemConfig
from smartdiff.shared.tensor_stream import tensor_to_messages
from smartdiff.text_encoder.v1 import text_encoder_pb2
from smartdiff.vae.v1 import vae_pb2

CPU = SystemConfig(torch.device("cpu"), torch.float32, max_queue=2)
SMALL = dict(width=32, height=32, frames=5, steps=3)


def run(body, model="wan-tiny", system=CPU):
    """Start the four services (wan-tiny, random weights), run `body(deployment, channel)`, stop them."""

    async def main():
        d = await EmbeddedDeployment.start(load_model_config(model), None, system)
        try:
            async with create_channel(d.address) as channel:
                return await body(d, channel)
        finally:
            await d.stop()

    return asyncio.run(main())


def gateway(channel):
    return gateway_pb2_grpc.GatewayServiceStub(channel)


async def expect_error(call, code: grpc.StatusCode, *words: str) -> str:
    """Await a coroutine or drain a streaming call, expecting it to fail with `code` naming `words`."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    assert err.value.code() == code, (err.value.code(), err.value.details())
    details = err.value.details()
    for w in words:
        assert w in details, details
    assert "Traceback" not in details and 'File "' not in details
    return details


@pytest.mark.parametrize("model,guidance", [("wan-tiny", (5.0,)), ("wan-tiny-moe", (4.0, 3.0))])
def test_gateway_latents_bitwise_equal_in_process_engine(model, guidance):
    req = GenerationRequest(prompt="a cat on grass", negative_prompt="blurry", guidance=guidance, seed=42,
                            width=48, height=32, frames=9, steps=4)

    async def body(d, channel):
        return await generate(gateway(channel), request_to_proto(req, return_latents=True))

    outcome = run(body, model)
    cfg = load_model_config(model)
    local = LocalPipeline.load(cfg, None, torch.device("cpu"), torch.float32).generate(resolve_request(req, cfg))
    assert torch.equal(outcome.latents, local.latents)
    assert probe_mp4(outcome.video)[:3] == (9, 48, 32)
    s = outcome.summary
    assert s.settings.seed == 42 and list(s.settings.guidance) == list(guidance)
    assert s.settings.attention_selection.startswith("sdpa") and s.settings.sampler == "unipc"
    assert [t.stage for t in s.stage_timings] == [gateway_pb2.STAGE_TEXT_ENCODER, gateway_pb2.STAGE_DENOISER,
                                                  gateway_pb2.STAGE_VAE]


def test_progress_events_and_frames_output_and_random_seed_reported():
    events = []

    async def body(d, channel):
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL), output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)
        return await generate(gateway(channel), r, on_progress=lambda *e: events.append(e))

    outcome = run(body)
    assert outcome.video is None and outcome.frames.shape == (5, 32, 32, 3) and outcome.frames.dtype == torch.uint8
    assert ("denoiser", 3, 3) in events and ("text_encoder", 1, 1) in events
    assert [e[1] for e in events if e[0] == "denoiser"] == [1, 2, 3]
    assert outcome.summary.settings.seed > 0  # drawn by the gateway and reported


def test_health_serving_after_warmup_and_capabilities():
    async def body(d, channel):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "smartdiff.gateway.v1.GatewayService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        return await gateway(channel).GetCapabilities(gateway_pb2.GetCapabilitiesRequest())

    caps = run(body)
    assert caps.models[0].name == "wan-tiny" and caps.default_model == "wan-tiny"
    assert set(caps.samplers) == {"unipc", "dpm++", "euler"}
    assert any(b.name == "sdpa" and b.available for b in caps.attention_backends)


@pytest.mark.parametrize("change,field", [
    (dict(width=30), "width"), (dict(frames=6), "frames"), (dict(steps=0), "steps"),
    (dict(sampler="ddim"), "sampler"), (dict(guidance=(1.0, 2.0, 3.0)), "guidance"), (dict(prompt=" "), "prompt"),
])
def test_bad_request_is_invalid_argument_naming_field_then_service_still_serves(change, field):
    async def body(d, channel):
        bad = request_to_proto(GenerationRequest(**{**dict(prompt="x", **SMALL), **change}))
        await expect_error(generate(gateway(channel), bad), grpc.StatusCode.INVALID_ARGUMENT, field)
        return await generate(gateway(channel), request_to_proto(GenerationRequest(prompt="x", seed=1, **SMALL)))

    assert run(body).video  # the good request after the bad one


def test_unoffered_attention_and_cache_are_refused():
    async def body(d, channel):
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL),
                             attention=options_pb2.AttentionConfig(backend="warp-drive"))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.INVALID_ARGUMENT, "attention.backend", "sdpa")
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL), cache=options_pb2.CacheConfig(strategy="magic"))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.INVALID_ARGUMENT, "cache.strategy")

    run(body)


def stage_stubs(d):
    stages = d.stages
    return stages.text_encoder, stages.denoiser, stages.vae


def denoise_stream(params, prompt=None, negative=None, corrupt=False):
    yield denoiser_pb2.DenoiseRequest(params=params)
    if prompt is not None:
        msgs = list(tensor_to_messages(prompt, denoiser_pb2.DenoiseRequest, "prompt_embeds", chunk_bytes=256))
        if corrupt:
            msgs[1].prompt_embeds.chunk.data = b"\x00" * len(msgs[1].prompt_embeds.chunk.data)
        yield from msgs
    if negative is not None:
        yield from tensor_to_messages(negative, denoiser_pb2.DenoiseRequest, "negative_prompt_embeds")


async def collect(call):
    return [m async for m in call]


def test_stage_errors_map_to_codes_and_each_stage_keeps_serving():
    params = denoiser_pb2.DenoiseParams(width=32, height=32, frames=1, steps=2, guidance=[1.0], seed=1)
    emb = torch.randn(7, 32)

    async def body(d, channel):
        te, dn, vae = stage_stubs(d)
        # text encoder: bad request, then a good one
        await expect_error(te.Encode(text_encoder_pb2.EncodeRequest(prompts=[])), grpc.StatusCode.INVALID_ARGUMENT,
                           "prompts")
        assert len(await collect(te.Encode(text_encoder_pb2.EncodeRequest(prompts=["ok"])))) >= 2
        # denoiser: corrupted tensor bytes -> DATA_LOSS; wrong embedding shape -> INVALID_ARGUMENT; params missing
        await expect_error(collect(dn.Denoise(denoise_stream(params, emb, corrupt=True))), grpc.StatusCode.DATA_LOSS,
                           "prompt_embeds")
        await expect_error(collect(dn.Denoise(denoise_stream(params, torch.randn(7, 5)))),
                           grpc.StatusCode.INVALID_ARGUMENT, "prompt_embeds", "[L, 32]")
        await expect_error(collect(dn.Denoise(iter([denoiser_pb2.DenoiseRequest(
            prompt_embeds=next(tensor_to_messages(emb, denoiser_pb2.DenoiseRequest, "prompt_embeds")).prompt_embeds)]))),
            grpc.StatusCode.INVALID_ARGUMENT, "params")
        cfg_params = denoiser_pb2.DenoiseParams()
        cfg_params.CopyFrom(params)
        cfg_params.guidance[:] = [5.0]
        await expect_error(collect(dn.Denoise(denoise_stream(cfg_params, emb))), grpc.StatusCode.INVALID_ARGUMENT,
                           "negative_prompt_embeds")
        good = await collect(dn.Denoise(denoise_stream(params, emb)))
        assert good[-1].WhichOneof("frame") == "summary"
        # vae: wrong latent shape, then a good decode
        bad = iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams()),
                    *tensor_to_messages(torch.zeros(1, 16, 1, 3, 3), vae_pb2.DecodeRequest, "latents")])
        await expect_error(collect(vae.Decode(bad)), grpc.StatusCode.INVALID_ARGUMENT, "latents")
        ok = iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)),
                   *tensor_to_messages(torch.zeros(1, 16, 1, 2, 2), vae_pb2.DecodeRequest, "latents")])
        assert (await collect(vae.Decode(ok)))[-1].summary.frames == 1

    run(body)


def test_stage_down_is_unavailable_naming_it():
    async def body(d, channel):
        await d.servers[2].stop(0)  # the vae
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.UNAVAILABLE, "vae")

    run(body)


def test_overload_is_resource_exhausted():
    async def body(d, channel):
        slow = request_to_proto(GenerationRequest(prompt="x", width=256, height=256, frames=33, steps=200, seed=1))
        calls = [asyncio.create_task(generate(gateway(channel), slow)) for _ in range(3)]  # gateway admits 2
        done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION, timeout=60)
        errors = [t.exception() for t in done if t.exception() is not None]
        for t in calls:
            t.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        assert errors and errors[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry" in errors[0].details()

    run(body)


@pytest.fixture
def denoiser_workers(monkeypatch):
    """The StageWorker of each denoiser started during the test (to see when its job really ended)."""
    from smartdiff.services.denoiser import server as dn

    made, real = [], dn.StageWorker

    def tracking(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(dn, "StageWorker", tracking)
    return made


@pytest.fixture
def step_times(monkeypatch):
    """time.monotonic() at the end of every denoising step computed by any engine.

    Each step is made to last at least 50 ms, as a real one does (seconds on a GPU), so that "within one step"
    is measured against a step and not against the time a cancel takes to cross two gRPC hops on a busy CPU.
    """
    from smartdiff.services.denoiser.engine import DenoiserEngine

    times, real = [], DenoiserEngine._guided_flow

    def timed(self, *a, **kw):
        out = real(self, *a, **kw)
        time.sleep(0.05)
        times.append(time.monotonic())
        return out

    monkeypatch.setattr(DenoiserEngine, "_guided_flow", timed)
    return times


async def wait_idle(worker, limit=30.0) -> None:
    start = time.monotonic()
    while worker.pending and time.monotonic() - start < limit:
        await asyncio.sleep(0.005)
    assert worker.pending == 0, "the denoiser job did not stop"


def test_cancel_stops_the_denoiser_within_one_step(denoiser_workers, step_times):
    async def body(d, channel):
        step_times.clear()  # drop the warm-up step
        r = request_to_proto(GenerationRequest(prompt="x", width=128, height=128, frames=17, steps=200, seed=1))
        call = gateway(channel).Generate(r)
        async for msg in call:
            if msg.WhichOneof("frame") == "progress" and msg.progress.stage == gateway_pb2.STAGE_DENOISER:
                if msg.progress.step == 3:
                    break
        call.cancel()
        cancelled_at = time.monotonic()
        await wait_idle(denoiser_workers[-1])
        return cancelled_at

    cancelled_at = run(body)
    after = [t for t in step_times if t > cancelled_at]
    assert 3 <= len(step_times) < 200 and len(after) <= 1, (len(step_times), len(after))


def test_deadline_propagates_and_expires_in_the_denoiser(denoiser_workers, step_times):
    async def body(d, channel):
        step_times.clear()
        r = request_to_proto(GenerationRequest(prompt="x", width=128, height=128, frames=17, steps=200, seed=1))
        await expect_error(generate(gateway(channel), r, timeout=1.5), grpc.StatusCode.DEADLINE_EXCEEDED)
        expired = time.monotonic()
        await wait_idle(denoiser_workers[-1])
        return expired

    expired = run(body)
    assert 0 < len(step_times) < 200 and len([t for t in step_times if t > expired]) <= 1


def test_vae_decode_does_not_block_the_denoiser(step_times, monkeypatch):
    """While the VAE decodes request 1, the denoiser already runs request 2's steps."""
    from smartdiff.services.vae.engine import VaeEngine

    decodes, real = [], VaeEngine.decode

    def timed_decode(self, *a, **kw):
        start = time.monotonic()
        out = real(self, *a, **kw)
        decodes.append((start, time.monotonic()))
        return out

    monkeypatch.setattr(VaeEngine, "decode", timed_decode)

    async def body(d, channel):
        decodes.clear()
        step_times.clear()
        req = lambda seed: request_to_proto(GenerationRequest(prompt="x", width=128, height=128, frames=33,  # noqa: E731
                                                              steps=6, seed=seed))
        await asyncio.gather(generate(gateway(channel), req(1)), generate(gateway(channel), req(2)))

    run(body)
    first_decode = min(decodes)
    assert any(first_decode[0] < t < first_decode[1] for t in step_times), "denoiser idle while the VAE decoded"
