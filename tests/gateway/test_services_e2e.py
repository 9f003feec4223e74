"""The four services over loopback gRPC: results equal the in-process engines, errors map to status codes,
every service keeps serving after a bad request, cancellation stops the denoiser within one step (in one process:
one DiT block)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smartdiff.denoiser.v1 import denoiser_pb2, options_pb2
from smartdiff.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smartdiff.services.denoiser import server as denoiser_server
from smartdiff.services.gateway.client import generate, request_to_proto
from smartdiff.services.gateway.embedded import EmbeddedDeployment
from smartdiff.services.gateway.local import LocalPipeline
from smartdiff.services.vae.video import probe_mp4
from smartdiff.shared.config import load_model_config
from smartdiff.shared.grpc_server import create_channel
from smartdiff.shared.errors import RequestError
from smartdiff.shared.request import GenerationRequest, resolve_request
from smartdiff.shared.serving import SystemConfig
from smartdiff.shared.tensor_stream import frames_to_tensor, tensor_to_messages
from smartdiff.text_encoder.v1 import text_encoder_pb2
from smartdiff.vae.v1 import vae_pb2, vae_pb2_grpc

CPU = SystemConfig(torch.device("cpu"), torch.float32, max_queue=2)
SMALL = dict(width=32, height=32, frames=5, steps=3)


def run(body, model="wan-tiny", system=CPU, denoiser=denoiser_server.DenoiserOptions()):
    """Start the four services (wan-tiny, random weights), run `body(deployment, channel)`, stop them."""

    async def main():
        d = await EmbeddedDeployment.start(load_model_config(model), None, system, denoiser=denoiser)
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
    assert s.settings.seed == 42 and list(s.settings.guidance) == list(guidance) and s.settings.fps == 16
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
    assert [e for e in events if e[0] == "vae"] == [("vae", 1, 2), ("vae", 2, 2)] and "mp4" not in [e[0] for e in events]
    assert outcome.summary.settings.seed > 0  # drawn by the gateway and reported
    assert outcome.summary.settings.fps == 0  # raw frames have no frame rate


def test_denoiser_progress_reports_each_steps_timestep_and_expert():
    """Two-expert model: the denoiser's progress carries the timestep and the expert of every step (the
    sampler's schedule; the low-noise expert below the boundary), and the gateway names the expert."""
    from smartdiff.services.denoiser.samplers import make_sampler

    model = load_model_config("wan-tiny-moe")
    steps = 6
    dim = model.dit.text_dim

    async def body(d, channel):
        _, denoiser, _ = stage_stubs(d)
        params = denoiser_pb2.DenoiseParams(width=32, height=32, frames=5, steps=steps, guidance=[1.0, 1.0], seed=3)
        stage = [m.progress for m in await collect(denoiser.Denoise(denoise_stream(params, torch.randn(4, dim))))
                 if m.WhichOneof("frame") == "progress"]
        events = []
        r = request_to_proto(GenerationRequest(prompt="x", width=32, height=32, frames=5, steps=steps),
                             output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)
        async for msg in gateway(channel).Generate(r):
            if msg.WhichOneof("frame") == "progress" and msg.progress.stage == gateway_pb2.STAGE_DENOISER:
                events.append(msg.progress.message)
        return stage, events

    stage, messages = run(body, "wan-tiny-moe")
    req = resolve_request(GenerationRequest(prompt="x", steps=steps), model)
    timesteps = make_sampler(req.sampler, steps, req.shift, model.num_train_timesteps).timesteps.tolist()
    experts = [0 if t >= model.boundary * model.num_train_timesteps else 1 for t in timesteps]
    assert 0 in experts and 1 in experts  # the schedule crosses the boundary
    assert [p.step for p in stage] == list(range(1, steps + 1))
    assert [p.timestep for p in stage] == pytest.approx(timesteps)
    assert [p.expert for p in stage] == experts
    assert messages == [f"expert {('high', 'low')[k]}-noise" for k in experts]


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


def raw_request(**fields) -> gateway_pb2.GenerateRequest:
    """The wire form with no client-side check: what any other client may send."""
    r = gateway_pb2.GenerateRequest(prompt=fields.pop("prompt", "x"))
    r.guidance.extend(fields.pop("guidance", ()))
    for name, value in fields.items():
        setattr(r, name, value)
    return r


BAD_FIELDS = [(dict(width=30), "width"), (dict(frames=6), "frames"), (dict(steps=0), "steps"),
              (dict(sampler="ddim"), "sampler"), (dict(prompt=" "), "prompt"),
              (dict(prompt="\x00\x00 \u200b"), "prompt"), (dict(prompt="&nbsp;&amp;#10;"), "prompt"),
              (dict(shift=1e-300), "shift"),
              (dict(negative_prompt="n" * 20_001), "negative_prompt"), (dict(prompt="p" * 20_001), "prompt"),
              (dict(guidance=(0.5,)), "guidance")]


@pytest.mark.parametrize("change,field", [*BAD_FIELDS, (dict(guidance=(1.0, 2.0, 3.0)), "guidance")])
def test_bad_request_is_invalid_argument_naming_field_then_service_still_serves(change, field):
    async def body(d, channel):
        bad = raw_request(**{**SMALL, **change})
        await expect_error(generate(gateway(channel), bad), grpc.StatusCode.INVALID_ARGUMENT, field)
        return await generate(gateway(channel), request_to_proto(GenerationRequest(prompt="x", seed=1, **SMALL)))

    assert run(body).video  # the good request after the bad one


@pytest.mark.parametrize("change,field", [*BAD_FIELDS, (dict(seed=-1), "seed"), (dict(width=-16), "width"),
                                          (dict(seed=10**20), "seed"), (dict(fps=0), "fps")])
def test_the_client_refuses_what_no_model_takes_before_sending(change, field):
    """request_to_proto checks the rules every model shares, so no value reaches a proto field it does not fit."""
    with pytest.raises(RequestError, match=f"^{field}: "):
        request_to_proto(GenerationRequest(**{"prompt": "x", **SMALL, **change}))


def test_unoffered_attention_and_cache_are_refused():
    async def body(d, channel):
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL),
                             attention=options_pb2.AttentionConfig(backend="warp-drive"))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.INVALID_ARGUMENT, "attention.backend", "sdpa")
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL), cache=options_pb2.CacheConfig(strategy="magic"))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.INVALID_ARGUMENT, "cache.strategy")

    run(body)


def test_a_backend_the_deployment_does_not_allow_is_refused_or_falls_back_when_asked():
    """Refused by the gateway before any stage runs, naming what is allowed; with allow_fallback the exact backend
    runs and the summary says why (the gateway and the denoiser agree)."""
    async def body(d, channel):
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL),
                             attention=options_pb2.AttentionConfig(backend="auto"))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.INVALID_ARGUMENT, "attention.backend",
                           "'auto' cannot run on this deployment: not allowed by this deployment",
                           "available: sdpa", "allow_fallback")
        r.attention.allow_fallback = True
        return (await generate(gateway(channel), r)).summary.settings

    settings = run(body, denoiser=denoiser_server.DenoiserOptions(attention_backends=("sdpa",)))
    assert settings.attention.backend == "sdpa"
    assert settings.attention_selection == "sdpa[cpu] (fallback from auto: not allowed by this deployment)"


def test_attention_and_cache_parameters_are_refused_before_any_work():
    """Their rules (ranges, NaN) are the gateway's check too: the error comes before QUEUED, and no stage ran."""
    nan = float("nan")
    bad = [(dict(attention=options_pb2.AttentionConfig(backend="sparge", allow_fallback=True,
                                                       sparge=options_pb2.SpargeAttentionParams(topk=nan))),
            "attention.sparge.topk"),
           (dict(attention=options_pb2.AttentionConfig(backend="auto", auto=options_pb2.AutoAttentionParams(
               tolerance=-1.0))), "attention.auto.tolerance"),
           (dict(cache=options_pb2.CacheConfig(strategy="teacache",
                                               teacache=options_pb2.TeaCacheParams(rel_l1_threshold=nan))),
            "cache.teacache.rel_l1_threshold"),
           (dict(cache=options_pb2.CacheConfig(strategy="budget",
                                               budget=options_pb2.BudgetParams(compute_fraction=1.5))),
            "cache.budget.compute_fraction")]

    async def main():
        options = denoiser_server.DenoiserOptions(enable_flexcache=True)
        d = await EmbeddedDeployment.start(load_model_config("wan-tiny"), None, CPU, denoiser=options)
        try:
            async with create_channel(d.address) as channel:
                for options, field in bad:
                    events = []
                    call = gateway(channel).Generate(request_to_proto(GenerationRequest(prompt="x", **SMALL),
                                                                      **options))
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for event in call:
                            events.append(event)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert err.value.details().startswith(f"{field}: "), err.value.details()
                    assert events == []  # refused before QUEUED: the text encoder never ran
                ok = request_to_proto(GenerationRequest(prompt="x", **SMALL),
                                      cache=options_pb2.CacheConfig(strategy="teacache"))
                return await generate(gateway(channel), ok)
        finally:
            await d.stop()

    assert asyncio.run(main()).video


def test_a_client_that_stops_reading_loses_its_generation_and_its_slot(monkeypatch):
    """The gateway waits WRITE_STALL_SECONDS at most for a client to take a message; a client that reads one and
    stops (its flow-control window full: the video's frame messages, BDP probing off) frees its slot, and is told
    why."""
    from smartdiff.services.gateway import server as gateway_server

    monkeypatch.setattr(gateway_server, "WRITE_STALL_SECONDS", 1.0)
    big = dict(width=128, height=128, frames=33, steps=2)  # 33 frames of 48 KiB: past a 64 KiB window

    async def main():
        d = await EmbeddedDeployment.start(load_model_config("wan-tiny"), None, CPU)  # max_queue 2
        try:
            stalled = [create_channel(d.address, options=[("grpc.http2.bdp_probe", 0)]) for _ in range(2)]
            try:
                calls = [gateway(ch).Generate(request_to_proto(
                    GenerationRequest(prompt="x", seed=s, **big), output_format=vae_pb2.OUTPUT_FORMAT_FRAMES))
                    for s, ch in enumerate(stalled)]
                for c in calls:
                    await c.read()  # accepted, then nothing read
                start = time.monotonic()
                async with create_channel(d.address) as channel:  # both slots were held: this one waits for them
                    for _ in range(100):
                        try:
                            done = await generate(gateway(channel), request_to_proto(
                                GenerationRequest(prompt="x", seed=3, **SMALL)))
                            break
                        except grpc.aio.AioRpcError as e:
                            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                            await asyncio.sleep(0.2)
                waited = time.monotonic() - start
                await asyncio.sleep(3)  # the other stalled call's frames: blocked for the stall limit too by now
                errors = []
                for c in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        while await c.read() is not grpc.aio.EOF:
                            pass
                    errors.append((err.value.code(), err.value.details()))
            finally:
                for ch in stalled:
                    await ch.close()
            return done, waited, errors
        finally:
            await d.stop()

    done, waited, errors = asyncio.run(main())
    assert done.video and waited < 30
    assert errors == [(grpc.StatusCode.DEADLINE_EXCEEDED,
                       "gateway: the client read nothing for 1 s; the generation was stopped")] * 2


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
        text_len = load_model_config("wan-tiny").text_encoder.text_len
        fits, over = " ".join(["cat"] * (text_len - 1)), " ".join(["cat"] * text_len)  # + </s>: text_len, + 1
        summary = (await collect(te.Encode(text_encoder_pb2.EncodeRequest(prompts=[fits, over]))))[-1].summary
        assert list(summary.token_counts) == [text_len, text_len] and list(summary.truncated_prompts) == [1]
        # denoiser: corrupted tensor bytes -> DATA_LOSS; wrong embedding shape -> INVALID_ARGUMENT; params missing
        await expect_error(collect(dn.Denoise(denoise_stream(params, emb, corrupt=True))), grpc.StatusCode.DATA_LOSS,
                           "prompt_embeds")
        await expect_error(collect(dn.Denoise(denoise_stream(params, torch.randn(7, 5)))),
                           grpc.StatusCode.INVALID_ARGUMENT, "prompt_embeds", "[L, 32]")
        await expect_error(collect(dn.Denoise(denoise_stream(params, torch.full((7, 32), float("nan"))))),
                           grpc.StatusCode.INVALID_ARGUMENT, "prompt_embeds: must be finite")
        await expect_error(collect(dn.Denoise(iter([denoiser_pb2.DenoiseRequest(
            prompt_embeds=next(tensor_to_messages(emb, denoiser_pb2.DenoiseRequest, "prompt_embeds")).prompt_embeds)]))),
            grpc.StatusCode.INVALID_ARGUMENT, "params")
        cfg_params = denoiser_pb2.DenoiseParams()
        cfg_params.CopyFrom(params)
        cfg_params.guidance[:] = [5.0]
        await expect_error(collect(dn.Denoise(denoise_stream(cfg_params, emb))), grpc.StatusCode.INVALID_ARGUMENT,
                           "negative_prompt_embeds")
        # a negative embedding sent without CFG is not used, but a malformed one is still refused
        await expect_error(collect(dn.Denoise(denoise_stream(params, emb, torch.randn(7, 5)))),
                           grpc.StatusCode.INVALID_ARGUMENT, "negative_prompt_embeds", "[L, 32]")
        # a required tensor never sent is a missing field, not data loss
        await expect_error(collect(dn.Denoise(denoise_stream(params))), grpc.StatusCode.INVALID_ARGUMENT,
                           "prompt_embeds: required")
        good = await collect(dn.Denoise(denoise_stream(params, emb)))
        assert good[-1].WhichOneof("frame") == "summary"
        # vae: wrong latent shapes (odd, empty, decoding past the size limits), no latents, then a good decode
        nan = torch.zeros(1, 16, 1, 2, 2)
        nan[0, 3, 0, 1, 1] = float("nan")
        for latents, words in ((torch.zeros(1, 16, 1, 3, 3), "even"), (torch.zeros(1, 16, 0, 2, 2), ">= 1"),
                               (torch.zeros(1, 16, 1, 2, 0), ">= 1"), (torch.zeros(1, 16, 1, 2, 258), "2048 pixels"),
                               (torch.zeros(1, 16, 62, 2, 2), "241 frames"), (nan, "finite"),
                               (nan.nan_to_num(nan=float("inf")), "finite"),
                               (torch.full((1, 16, 1, 2, 2), 1e38), "decoded to non-finite values")):  # not black
            bad = iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams()),
                        *tensor_to_messages(latents, vae_pb2.DecodeRequest, "latents")])
            await expect_error(collect(vae.Decode(bad)), grpc.StatusCode.INVALID_ARGUMENT, "latents", words)
        await expect_error(collect(vae.Decode(iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams())]))),
                           grpc.StatusCode.INVALID_ARGUMENT, "latents: required")
        # raw frames: the request's fps is ignored (0 too), and the summary says 0 fps and no encoding time
        ok = iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(output_format=vae_pb2.OUTPUT_FORMAT_FRAMES, fps=0)),
                   *tensor_to_messages(torch.zeros(1, 16, 1, 2, 2), vae_pb2.DecodeRequest, "latents")])
        summary = (await collect(vae.Decode(ok)))[-1].summary
        assert (summary.frames, summary.fps, summary.encode_seconds) == (1, 0, 0.0)
        # mp4: the encoder takes each latent frame's video frames while the next one decodes
        mp4 = iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(fps=24)),
                    *tensor_to_messages(torch.zeros(1, 16, 2, 2, 2), vae_pb2.DecodeRequest, "latents")])
        out = await collect(vae.Decode(mp4))
        phases = [(m.progress.phase, m.progress.step, m.progress.total) for m in out if m.WhichOneof("frame") == "progress"]
        assert phases == [(vae_pb2.DECODE_PHASE_DECODING, 1, 2), (vae_pb2.DECODE_PHASE_ENCODING, 1, 5),
                          (vae_pb2.DECODE_PHASE_DECODING, 2, 2), *[(vae_pb2.DECODE_PHASE_ENCODING, i, 5) for i in range(2, 6)]]
        assert out[-1].summary.fps == 24 and out[-1].summary.encode_seconds > 0
        assert [m.WhichOneof("frame") for m in out][len(phases):] == ["mp4"] * 3 + ["summary"]
        assert out[len(phases)].mp4.spec.name == "video.mp4" and probe_mp4(frames_to_tensor(
            [m.mp4 for m in out[len(phases):-1]]).numpy().tobytes())[:3] == (5, 16, 16)

    run(body)


def test_vae_streams_each_latent_frames_video_while_the_next_decodes():
    """Raw frames leave the VAE piece by piece between its progress events, add up to the whole decode, and the
    gateway passes them on as they come; a latent frame that decodes to NaN ends the stream with the error after
    the frames before it."""
    from smartdiff.services.vae.engine import VaeEngine

    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))

    def decode_call(z):
        return iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)),
                     *tensor_to_messages(z, vae_pb2.DecodeRequest, "latents")])

    async def body(d, channel):
        vae = stage_stubs(d)[2]
        out = await collect(vae.Decode(decode_call(latents)))
        kinds = [m.WhichOneof("frame") for m in out]
        # spec + the chunk of latent frame 1's video, then progress 1/3, ... (the next frame is queued first)
        assert kinds.index("frames") < [i for i, k in enumerate(kinds) if k == "progress"][-1]
        frames = frames_to_tensor([m.frames for m in out if m.WhichOneof("frame") == "frames"])
        expected = VaeEngine.random(load_model_config("wan-tiny").vae, seed=0).decode(latents)[0]
        assert torch.equal(frames, expected) and out[-1].summary.video_bytes == expected.numel()

        late_nan = latents.clone()
        late_nan[:, :, 2] = 1e38
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for m in vae.Decode(decode_call(late_nan)):
                got.append(m.WhichOneof("frame"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in err.value.details()
        assert "frames" in got and "summary" not in got

        request = request_to_proto(GenerationRequest(prompt="a fox", seed=1, **SMALL),
                                   output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)
        kinds = [m.WhichOneof("frame") async for m in gateway(channel).Generate(request)]
        vae_progress = [i for i, k in enumerate(kinds) if k == "progress"][-1]
        assert kinds.index("frames") < vae_progress < len(kinds) - 1
        assert await vae.Decode(decode_call(latents)).read() is not None  # still serving

    run(body)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_deployment_on_the_second_gpu_generates_what_one_on_the_first_does():
    """Every stage's work runs with its device current (Triton kernels launch on the current device): a deployment
    on cuda:1, started from a thread on cuda:0, gives the latents and frames of one on cuda:0."""
    req = GenerationRequest(prompt="a fox", seed=3, width=64, height=64, frames=9, steps=3)

    def on(device):
        async def body(d, channel):
            return await generate(gateway(channel), request_to_proto(
                req, return_latents=True, output_format=vae_pb2.OUTPUT_FORMAT_FRAMES))

        torch.cuda.set_device(0)
        return run(body, system=SystemConfig(torch.device(device), torch.bfloat16, max_queue=2),
                   denoiser=denoiser_server.DenoiserOptions(compile="off"))

    first, second = on("cuda:0"), on("cuda:1")
    assert torch.equal(first.latents, second.latents) and torch.equal(first.frames, second.frames)


def test_text_encoder_skips_requests_whose_deadline_passed_in_its_queue(monkeypatch):
    from smartdiff.services.text_encoder.engine import TextEncoderEngine

    calls = []
    real = TextEncoderEngine.encode

    def slow(self, prompts, **kw):
        calls.append(prompts)
        time.sleep(1.0)
        return real(self, prompts, **kw)

    async def body(d, channel):
        te = stage_stubs(d)[0]
        monkeypatch.setattr(TextEncoderEngine, "encode", slow)
        req = text_encoder_pb2.EncodeRequest(prompts=["x"])
        first, queued = (asyncio.create_task(collect(te.Encode(req, timeout=0.3))) for _ in range(2))
        for task in (first, queued):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await task
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(1.5)  # the first encode ends; the queued one must not start
        assert len(calls) == 1
        monkeypatch.setattr(TextEncoderEngine, "encode", real)
        assert len(await collect(te.Encode(req))) >= 2  # and the stage still serves

    run(body)


def test_stage_down_is_unavailable_naming_it(monkeypatch):
    from smartdiff.services.gateway import server as gateway_server

    monkeypatch.setattr(gateway_server, "STAGE_CONNECT_WAIT", 0.5)

    async def body(d, channel):
        await d.servers[2].stop(0)  # the vae
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL))
        await expect_error(generate(gateway(channel), r), grpc.StatusCode.UNAVAILABLE, "vae")

    run(body)


def test_stage_down_under_a_short_deadline_still_names_the_stage():
    """The wait for a replica ends before the client's deadline, so the error names the stage instead of the
    client's own DEADLINE_EXCEEDED."""
    async def body(d, channel):
        await d.servers[2].stop(0)  # the vae
        r = request_to_proto(GenerationRequest(prompt="x", **SMALL))
        start = time.monotonic()
        await expect_error(generate(gateway(channel), r, timeout=3.0), grpc.StatusCode.UNAVAILABLE, "vae")
        return time.monotonic() - start

    assert run(body) < 3.0 - 0.3  # not a race with the client's own deadline


def test_requests_waiting_for_a_stage_survive_each_others_channel_renewal():
    """Several requests wait for a stage that is down; one of them replaces the channel (a fresh name lookup),
    closing the one the others wait on: they go on waiting on the new one (they failed INTERNAL, "Channel is
    closed"), and all end UNAVAILABLE naming the stage."""
    from smartdiff.services.denoiser.launch import free_port
    from smartdiff.services.gateway.server import StageClients

    async def main():
        down = f"127.0.0.1:{free_port()}"
        stages = StageClients(down, down, down)
        try:
            waits = [asyncio.create_task(stages.reachable("vae", 3.5)) for _ in range(4)]
            results = await asyncio.gather(*waits, return_exceptions=True)
        finally:
            await stages.close()
        return results

    from smartdiff.shared.errors import StageUnavailable

    results = asyncio.run(main())
    assert all(isinstance(r, StageUnavailable) and "vae" in r.message for r in results), results


def test_the_denoisers_capabilities_wait_on_a_renewed_channel(monkeypatch):
    """The capabilities call (every request's first, and the gateway's readiness) goes through the same wait as
    the stage calls, which replaces a channel stuck in gRPC's reconnect backoff (up to 2 minutes)."""
    from smartdiff.services.gateway.server import GatewayServicer, StageClients

    waited = []
    real = StageClients.reachable

    async def recording(self, stage, left):
        waited.append(stage)
        return await real(self, stage, left)

    monkeypatch.setattr(StageClients, "reachable", recording)

    async def body(d, channel):
        waited.clear()  # the gateway's own readiness wait made one at start
        servicer = GatewayServicer(load_model_config("wan-tiny"), d.stages)
        caps = await servicer.denoiser_capabilities(timeout=5.0)
        return caps

    assert run(body).models and waited == ["denoiser"]


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


def test_a_cancel_that_fails_the_gateways_write_still_stops_the_stage_call(denoiser_workers, step_times):
    """A client that cancels while the gateway writes to it fails the write (grpc raises from context.write),
    which closes the generation at a `yield`: the denoiser call in progress must be cancelled there too, and
    the generation ends as cancelled, not as an internal error."""
    from smartdiff.services.gateway.server import GatewayServicer

    class GoneClient:  # the handler's context: the client is gone once the denoiser reports its first step
        def time_remaining(self):
            return None

        async def write(self, msg):
            if msg.WhichOneof("frame") == "progress" and msg.progress.stage == gateway_pb2.STAGE_DENOISER:
                raise RuntimeError("execute_batch failed")  # what grpc raises for a send to a cancelled call

    async def body(d, channel):
        step_times.clear()
        servicer = GatewayServicer(load_model_config("wan-tiny"), d.stages)
        r = request_to_proto(GenerationRequest(prompt="x", width=64, height=64, frames=9, steps=200, seed=1))
        with pytest.raises(asyncio.CancelledError):
            await servicer.Generate(r, GoneClient())
        stopped_at = time.monotonic()
        await wait_idle(denoiser_workers[-1])
        assert servicer.in_flight == 0
        return stopped_at

    stopped_at = run(body)
    assert len(step_times) < 200 and len([t for t in step_times if t > stopped_at]) <= 2, len(step_times)


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


def test_cancel_stops_the_denoiser_within_one_block(denoiser_workers, monkeypatch):
    """A cancel in the middle of a step stops the single-process denoiser after the DiT block that is running:
    no block starts once the cancel reached it, though the step has blocks left (a 14B 720p step takes
    seconds to tens of seconds on a GPU)."""
    from smartdiff.services.denoiser.dit import WanAttentionBlock

    starts, real = [], WanAttentionBlock.forward

    def slow_block(self, *a, **kw):
        starts.append(time.monotonic())
        time.sleep(0.5)  # as a block of a large model does
        return real(self, *a, **kw)

    async def body(d, channel):
        monkeypatch.setattr(WanAttentionBlock, "forward", slow_block)  # the warm-up ran at full speed
        r = request_to_proto(GenerationRequest(prompt="x", width=32, height=32, frames=5, steps=2, seed=1))
        call = gateway(channel).Generate(r)
        reading = asyncio.ensure_future(call.read())
        while not starts:
            await asyncio.sleep(0.005)
        call.cancel()
        cancelled_at = time.monotonic()
        await wait_idle(denoiser_workers[-1])
        reading.cancel()
        return cancelled_at

    cancelled_at = run(body)
    blocks_per_step = load_model_config("wan-tiny").dit.num_layers  # at least: CFG may batch its two branches
    assert len(starts) == 1 < blocks_per_step, [t - cancelled_at for t in starts]


def test_deadline_propagates_and_expires_in_the_denoiser(denoiser_workers, step_times):
    async def body(d, channel):
        step_times.clear()
        r = request_to_proto(GenerationRequest(prompt="x", width=128, height=128, frames=17, steps=200, seed=1))
        await expect_error(generate(gateway(channel), r, timeout=1.5), grpc.StatusCode.DEADLINE_EXCEEDED)
        expired = time.monotonic()
        await wait_idle(denoiser_workers[-1])
        return expired

    expired = run(body)
    # The denoiser's deadline is the gateway's remaining time when it calls it, so it can trail the client's by
    # the channel's set-up and transit (tens of ms on a loaded machine): a step or two, never the 200.
    late = [t - expired for t in step_times if t > expired]
    assert 0 < len(step_times) < 200 and (len(late) <= 1 or max(late) < 0.3), late


def test_vae_decode_does_not_block_the_denoiser(step_times, monkeypatch):
    """While the VAE decodes request 1, the denoiser already runs request 2's steps."""
    from smartdiff.services.vae.engine import VaeEngine

    decodes, real = [], VaeEngine.decode_pieces

    def timed_decode(self, *a, **kw):
        start = time.monotonic()
        yield from real(self, *a, **kw)
        decodes.append((start, time.monotonic()))

    monkeypatch.setattr(VaeEngine, "decode_pieces", timed_decode)

    async def body(d, channel):
        decodes.clear()
        step_times.clear()
        req = lambda seed: request_to_proto(GenerationRequest(prompt="x", width=128, height=128, frames=33,  # noqa: E731
                                                              steps=6, seed=seed))
        await asyncio.gather(generate(gateway(channel), req(1)), generate(gateway(channel), req(2)))

    run(body)
    first_decode = min(decodes)
    assert any(first_decode[0] < t < first_decode[1] for t in step_times), "denoiser idle while the VAE decoded"


def test_gateway_is_not_serving_until_the_denoiser_answers(caplog):
    """Started before its stages (any order on Kubernetes), the gateway waits for the denoiser's capabilities,
    logging why, and does not report SERVING meanwhile."""
    from smartdiff.services.gateway import server as gateway_server

    async def main():
        stages = gateway_server.StageClients("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")  # nothing listens
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(gateway_server.start(load_model_config("wan-tiny"), stages, "127.0.0.1:0"),
                                       3.0)
        finally:
            await stages.close()

    caplog.set_level("WARNING", logger="smartdiff.gateway")
    asyncio.run(main())
    assert "gateway not ready: stage denoiser unavailable" in caplog.text


def test_serve_all_puts_the_stages_on_loopback_and_the_gateway_on_its_host():
    async def main():
        d = await EmbeddedDeployment.start(load_model_config("wan-tiny"), None, CPU, gateway_host="0.0.0.0")
        try:
            assert d.address.startswith("0.0.0.0:")
            assert all(a.startswith("127.0.0.1:") for a in d.stages.addresses.values())
            async with create_channel(f"127.0.0.1:{d.address.rsplit(':', 1)[1]}") as channel:
                caps = await gateway(channel).GetCapabilities(gateway_pb2.GetCapabilitiesRequest())
            return caps.default_model
        finally:
            await d.stop()

    assert asyncio.run(main()) == "wan-tiny"


def test_sigterm_drain_answers_not_serving_while_the_request_in_flight_finishes():
    """StageServer.drain (what SIGTERM runs) on the gateway: NOT_SERVING at once, the generation in flight goes on
    to its whole video, then the server stops, LINGER after the last call ended."""
    from smartdiff.shared.grpc_server import LINGER

    async def body(d, channel):
        gw_server = d.servers[-1]
        r = request_to_proto(GenerationRequest(prompt="x", width=64, height=64, frames=9, steps=30, seed=1))
        call = gateway(channel).Generate(r)
        async for msg in call:
            if msg.WhichOneof("frame") == "progress" and msg.progress.stage == gateway_pb2.STAGE_DENOISER:
                break
        loop = asyncio.get_running_loop()
        drain = asyncio.create_task(gw_server.drain(60))
        await asyncio.sleep(0.2)
        status = (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))).status
        frames = [msg.WhichOneof("frame") async for msg in call]
        done = loop.time()
        await drain
        return status, frames, loop.time() - done

    status, frames, after = run(body)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert frames[-1] == "summary" and "mp4" in frames
    assert LINGER - 0.1 <= after < LINGER + 2


def test_a_draining_stage_replica_is_skipped():
    """Two VAE replicas behind one gateway (the round-robin target a headless Service resolves to): while one
    drains with a call in flight (NOT_SERVING), every new generation goes to the other."""
    from smartdiff.services.gateway import server as gateway_server
    from smartdiff.services.vae import server as vae_server

    async def body(d, channel):
        model = load_model_config("wan-tiny")
        spare, spare_port = await vae_server.start(model, None, CPU, "127.0.0.1:0")
        draining = d.servers[2]  # the deployment's own VAE
        addrs = d.stages.addresses
        stages = gateway_server.StageClients(addrs["text_encoder"], addrs["denoiser"],
                                             f"ipv4:{addrs['vae']},127.0.0.1:{spare_port}")
        gw, gw_port = await gateway_server.start(model, stages, "127.0.0.1:0", 4)
        held_channel = create_channel(addrs["vae"])
        try:
            held = vae_pb2_grpc.VaeServiceStub(held_channel).Decode()  # a decode in flight: params, no latents yet
            await held.write(vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(request_id="held", model="wan-tiny")))
            while draining.in_flight.count == 0:
                await asyncio.sleep(0.01)
            drain = asyncio.create_task(draining.drain(30))
            await asyncio.sleep(0.2)
            calls = draining.in_flight.total
            async with create_channel(f"127.0.0.1:{gw_port}") as gw_channel:
                outcomes = [await generate(gateway(gw_channel), request_to_proto(GenerationRequest(
                    prompt="x", seed=i, **SMALL))) for i in range(4)]
            assert not drain.done()  # the held decode kept the draining replica in its drain throughout
            assert draining.in_flight.total == calls  # and no new call went there
            held.cancel()
            await asyncio.wait_for(drain, 10)
            return outcomes
        finally:
            await held_channel.close()
            await gw.stop(1)
            await stages.close()
            await spare.stop(1)

    outcomes = run(body)
    assert all(probe_mp4(o.video)[:3] == (5, 32, 32) for o in outcomes)


def test_a_stage_restarting_is_waited_for():
    """A stage that is down when a request reaches it, and back a moment later (a pod restarting, a replica
    replaced): the request waits for it instead of failing."""
    from smartdiff.services.vae import server as vae_server

    async def body(d, channel):
        vae = d.servers[2]
        address = d.stages.addresses["vae"]
        await vae.stop(0)
        call = asyncio.create_task(generate(gateway(channel), request_to_proto(GenerationRequest(prompt="x",
                                                                                                 **SMALL))))
        await asyncio.sleep(1.0)
        assert not call.done()
        d.servers[2], _ = await vae_server.start(load_model_config("wan-tiny"), None, CPU, address)
        return await asyncio.wait_for(call, 60)

    outcome = run(body)
    assert probe_mp4(outcome.video)[:3] == (5, 32, 32)


def test_the_summary_names_the_prompts_the_text_encoder_cut():
    long = " ".join(["cat"] * 600)

    async def body(d, channel):
        request = request_to_proto(GenerationRequest(prompt="a fox", negative_prompt=long, guidance=(5.0,), seed=1,
                                                     **SMALL))
        out = [m async for m in gateway(channel).Generate(request)]
        te = [m.progress for m in out if m.WhichOneof("frame") == "progress"
              and m.progress.stage == gateway_pb2.STAGE_TEXT_ENCODER]
        return list(out[-1].summary.truncated_prompts), te[-1].message

    assert run(body) == (["negative_prompt"], "cut to 512 tokens: negative_prompt")


def test_cfg_batch_off_runs_the_branches_one_after_the_other_with_the_same_latents(monkeypatch):
    from smartdiff.services.denoiser.dit import WanDiT

    req = GenerationRequest(prompt="a cat on grass", negative_prompt="blurry", guidance=(5.0,), seed=7, **SMALL)
    batches = []
    real = WanDiT.forward

    def spy(self, x, *args, **kwargs):
        batches.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "forward", spy)

    async def body(d, channel):
        return await generate(gateway(channel), request_to_proto(req, return_latents=True))

    batched = run(body)
    warm_and_batched, batches[:] = list(batches), []
    one_by_one = run(body, denoiser=denoiser_server.DenoiserOptions(cfg_batch="off"))
    assert set(warm_and_batched) == {2} and set(batches) == {1}
    assert len(batches) == 2 * len(warm_and_batched)
    torch.testing.assert_close(one_by_one.latents, batched.latents, rtol=1e-5, atol=1e-5)


def test_cfg_batch_flag_and_its_rule():
    import argparse

    p = argparse.ArgumentParser()
    denoiser_server.add_denoiser_flags(p)
    default = denoiser_server.options_from_args(p.parse_args([]))
    off = denoiser_server.options_from_args(p.parse_args(["--cfg-batch", "off"]))
    on = denoiser_server.options_from_args(p.parse_args(["--cfg-batch", "on"]))
    tiny = load_model_config("wan-tiny")
    batched = {(o.cfg_batch, level): denoiser_server.engine_options(o, tiny, level)["batch_cfg"]
               for o in (default, off, on) for level in (0, 3)}
    assert batched == {("auto", 0): True, ("auto", 3): False, ("off", 0): False, ("off", 3): False,
                       ("on", 0): True, ("on", 3): True}
    with pytest.raises(SystemExit):
        p.parse_args(["--cfg-batch", "sometimes"])
    from smartdiff.shared.config import ConfigError

    with pytest.raises(ConfigError, match="--cfg-batch off: with --cfg-degree 2"):
        denoiser_server.check_options(denoiser_server.DenoiserOptions(cfg_batch="off", cfg_degree=2),
                                      load_model_config("wan-tiny"), torch.device("cpu"), torch.float32)


def test_non_finite_latents_are_the_denoisers_error_not_the_users(monkeypatch):
    from smartdiff.services.denoiser.engine import DenoiserEngine

    real = DenoiserEngine.denoise
    broken = {"on": False}  # (the warm-up before SERVING runs it too)

    def denoise(self, *args, **kwargs):
        latents = real(self, *args, **kwargs)
        return latents * float("nan") if broken["on"] else latents

    monkeypatch.setattr(DenoiserEngine, "denoise", denoise)
    req = GenerationRequest(prompt="a cat", seed=1, **SMALL)

    async def body(d, channel):
        broken["on"] = True
        details = await expect_error(gateway(channel).Generate(request_to_proto(req)), grpc.StatusCode.INTERNAL,
                                     "stage denoiser failed", "not finite", "attention")
        assert "latents: must be finite" not in details  # not blamed on the request
        broken["on"] = False
        return await generate(gateway(channel), request_to_proto(req))

    assert run(body).video


def test_fields_this_api_lacks_are_refused_not_dropped():
    req = GenerationRequest(prompt="a cat", seed=1, **SMALL)
    params = denoiser_pb2.DenoiseParams(width=32, height=32, frames=1, steps=1, guidance=[1.0], seed=1)
    emb = torch.randn(7, 32)

    def with_unknown(msg, tag: bytes):  # a field number the proto does not define, as a newer client sends it
        msg.MergeFromString(tag + b"\x01")
        return msg

    async def body(d, channel):
        top = with_unknown(request_to_proto(req), b"\x98\x06")  # field 99
        await expect_error(gateway(channel).Generate(top), grpc.StatusCode.INVALID_ARGUMENT,
                           "request: unknown field number 99", "GenerateRequest")
        nested = request_to_proto(req)
        with_unknown(nested.cache, b"\xf8\x07")  # field 127 of CacheConfig
        await expect_error(gateway(channel).Generate(nested), grpc.StatusCode.INVALID_ARGUMENT,
                           "request.cache: unknown field number 127", "CacheConfig")
        te, dn, _ = stage_stubs(d)
        await expect_error(te.Encode(with_unknown(text_encoder_pb2.EncodeRequest(prompts=["x"]), b"\xf8\x07")),
                           grpc.StatusCode.INVALID_ARGUMENT, "request: unknown field number 127")
        await expect_error(collect(dn.Denoise(denoise_stream(with_unknown(params, b"\xf8\x07"), emb))),
                           grpc.StatusCode.INVALID_ARGUMENT, "params: unknown field number 127", "DenoiseParams")
        return await generate(gateway(channel), request_to_proto(req))

    assert run(body).video


def test_a_gateway_whose_stages_serve_another_model_is_refused_and_never_blames_the_request():
    from smartdiff.services.gateway import server as gateway_server
    from smartdiff.shared.config import ConfigError
    from smartdiff.shared.errors import ServiceError, calling_stage

    other = load_model_config("wan-tiny-moe")

    async def body(d, channel):
        with pytest.raises(ConfigError, match="serves wan-tiny, this gateway wan-tiny-moe"):
            await gateway_server.wait_for_denoiser(gateway_server.GatewayServicer(other, d.stages))
        # a stage that serves another model is the deployment's fault (FAILED_PRECONDITION), not the request's
        with pytest.raises(ServiceError) as err:
            with calling_stage("text_encoder"):
                await d.stages.text_encoder.Encode(text_encoder_pb2.EncodeRequest(model=other.name, prompts=["x"])).read()
        return err.value

    err = run(body)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves 'wan-tiny', not 'wan-tiny-moe'" in err.message and "deployment error" in err.message


def test_a_text_encoder_that_breaks_its_contract_is_not_blamed_on_the_request(monkeypatch):
    from smartdiff.services.text_encoder.engine import TextEncoderEngine

    real = TextEncoderEngine.encode
    broken = {"on": False}

    def encode(self, prompts, **kw):
        out = real(self, prompts, **kw)
        return out[:1] if broken["on"] else out  # one embedding for two prompts

    monkeypatch.setattr(TextEncoderEngine, "encode", encode)
    req = GenerationRequest(prompt="a cat", negative_prompt="blur", guidance=(5.0,), seed=1, **SMALL)

    async def body(d, channel):
        broken["on"] = True
        await expect_error(gateway(channel).Generate(request_to_proto(req)), grpc.StatusCode.INTERNAL,
                           "text_encoder: returned 1 embeddings for 2 prompts")
        broken["on"] = False
        return await generate(gateway(channel), request_to_proto(req))

    assert run(body).video


def test_vae_skips_requests_whose_deadline_passed_in_its_queue(monkeypatch):
    from smartdiff.services.vae.engine import VaeEngine

    calls = []
    real = VaeEngine.decode_pieces

    def slow(self, latents, **kw):
        calls.append(1)
        time.sleep(1.0)
        yield from real(self, latents, **kw)

    async def body(d, channel):
        vae = stage_stubs(d)[2]
        monkeypatch.setattr(VaeEngine, "decode_pieces", slow)

        def call(timeout=None):
            msgs = [vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)),
                    *tensor_to_messages(torch.zeros(1, 16, 1, 2, 2), vae_pb2.DecodeRequest, "latents")]
            return collect(vae.Decode(iter(msgs), timeout=timeout))

        first = asyncio.create_task(call(30))
        while not calls:  # the first decode runs (for a second)
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(0.3)  # queued behind it, and past its deadline before it could start
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await first)[-1].WhichOneof("frame") == "summary"
        await asyncio.sleep(0.5)
        assert len(calls) == 1  # the queued one never started
        monkeypatch.setattr(VaeEngine, "decode_pieces", real)
        assert (await call())[-1].WhichOneof("frame") == "summary"  # and the stage still serves

    run(body)


def test_the_gateway_renews_the_denoisers_capabilities_and_keeps_the_last_when_it_cannot(monkeypatch):
    from smartdiff.services.gateway import server as gateway_server

    answers = [denoiser_pb2.GetCapabilitiesResponse(models=["a"]), denoiser_pb2.GetCapabilitiesResponse(models=["b"])]

    class Denoiser:
        async def GetCapabilities(self, request, timeout=None):
            if not answers:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "down")
            return answers.pop(0)

    class Stages:
        denoiser = Denoiser()

        async def reachable(self, stage, left):
            return None

    servicer = gateway_server.GatewayServicer(load_model_config("wan-tiny"), Stages())

    async def asks():
        seen = [list((await servicer.denoiser_capabilities(5.0)).models)]
        seen.append(list((await servicer.denoiser_capabilities(5.0)).models))  # fresh: not asked again
        monkeypatch.setattr(gateway_server, "CAPABILITIES_SECONDS", 0.0)
        seen.append(list((await servicer.denoiser_capabilities(5.0)).models))  # renewed
        seen.append(list((await servicer.denoiser_capabilities(5.0)).models))  # down: the last answer
        return seen

    assert asyncio.run(asks()) == [["a"], ["a"], ["b"], ["b"]]
