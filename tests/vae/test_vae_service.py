"""The vae service's compute dtype: float32 unless the deployment's --dtype says otherwise, with matching tiles."""

import asyncio
import types

import pytest
import torch

import smartdiff.services.vae.__main__ as vae_main
import smartdiff.shared.serving as serving
from smartdiff.services.vae.tiling import TilingConfig
from smartdiff.shared.config import load_model_config
from smartdiff.shared.serving import SystemConfig


@pytest.fixture
def started(monkeypatch):
    """What the vae service started: its engine (start_stage replaced, nothing listens)."""
    seen = {}

    async def fake_start_stage(name, add, servicer, address, max_queue, warmup=None):
        seen["engine"] = servicer.engine
        return None, 0

    monkeypatch.setattr(serving, "start_stage", fake_start_stage)
    return seen


@pytest.mark.parametrize("flag, dtype", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_flag_reaches_the_engine_and_picks_its_tiles(monkeypatch, started, flag, dtype):
    monkeypatch.setattr(vae_main, "stage_main", lambda stage, run, argv, extra_flags: started.setdefault("run", run))
    vae_main.main([])
    # the system as the shared flags resolve it (--dtype given); without --dtype, bfloat16 as on a GPU deployment,
    # which the VAE must not take (it stays float32)
    args = types.SimpleNamespace(device="cpu", dtype=flag, low_mem_level=1, tiling=None)
    system = serving.system_from_args(args) if flag else SystemConfig(torch.device("cpu"), torch.bfloat16, 1)
    asyncio.run(started["run"](load_model_config("wan-tiny"), None, system, "127.0.0.1:0", args))
    engine = started["engine"]
    assert engine.dtype == dtype and next(engine.model.parameters()).dtype == dtype
    assert engine.tiling == TilingConfig.for_dtype(dtype)


def test_tiling_flag_sets_the_tiles_and_is_validated(monkeypatch, started, capsys):
    monkeypatch.setattr(serving, "run_until_signal", lambda server, drain: asyncio.sleep(0))
    assert vae_main.main(["--low-mem-level", "1", "--tiling", "48:6:4", "--port", "0"]) == 0
    assert started["engine"].tiling == TilingConfig(48, 6, 4)
    with pytest.raises(SystemExit):  # argparse: the rule, then exit 2
        vae_main.main(["--tiling", "48x6"])
    assert "TILE:OVERLAP[:FRAMES]" in capsys.readouterr().err
    assert vae_main.main(["--tiling", "48:6:4", "--port", "0"]) == 2  # level 0 has no tiles
    assert "--low-mem-level 1" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["48", "48:6:4:1", "a:6", "48:-1", "8:4"])
def test_tiling_parse_refuses_with_the_rule(text):
    with pytest.raises(ValueError, match="tiling"):
        TilingConfig.parse(text)


def test_decode_and_encode_seconds_split_where_the_last_piece_was_decoded(monkeypatch):
    """mp4: decode_seconds ends when the last piece is decoded, before ffmpeg takes it; encode_seconds is what
    the encoder took after that. (The tiled path yields the whole video as one piece: decode_seconds counted
    pushing every frame into ffmpeg.)"""
    import time

    from smartdiff.services.vae import server as vae_server
    from smartdiff.services.vae.engine import VaeEngine
    from smartdiff.shared.tensor_stream import tensor_to_messages
    from smartdiff.shared.worker import StageWorker
    from smartdiff.vae.v1 import vae_pb2

    model = load_model_config("wan-tiny")
    engine = VaeEngine.random(model.vae)

    def slow_decode(latents, progress=None):  # 0.3 s of decoding, then the whole video in one piece
        time.sleep(0.3)
        yield torch.zeros(1, 5, 16, 16, 3, dtype=torch.uint8)

    def slow_encode(pieces, fps, total, progress):  # 0.5 s of encoding per piece, as it comes
        for _ in pieces:
            time.sleep(0.5)
        return b"mp4"

    monkeypatch.setattr(engine, "decode_pieces", slow_decode)
    monkeypatch.setattr(vae_server, "encode_mp4", slow_encode)
    servicer = vae_server.VaeServicer(model, engine, StageWorker("vae"))

    async def requests():
        yield vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams())
        for m in tensor_to_messages(torch.zeros(1, 16, 2, 2, 2), vae_pb2.DecodeRequest, "latents"):
            yield m

    context = types.SimpleNamespace(time_remaining=lambda: None)

    async def main():
        return [m async for m in servicer.Decode(requests(), context)]

    summary = asyncio.run(main())[-1].summary
    assert 0.3 <= summary.decode_seconds < 0.45 and 0.5 <= summary.encode_seconds < 0.65, summary


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_vae_stage_on_the_second_gpu_serves_what_one_on_the_first_decodes():
    """Wan2.1's VAE (random weights) served on cuda:1 from a process whose main thread is on cuda:0: its warm-up
    and requests run with cuda:1 current (Triton's fused kernels, the copy events), and stream the frames an
    engine on cuda:0 decodes."""
    from smartdiff.services.vae import server as vae_server
    from smartdiff.services.vae.engine import VaeEngine
    from smartdiff.shared.grpc_server import create_channel
    from smartdiff.shared.tensor_stream import frames_to_tensor, tensor_to_messages
    from smartdiff.vae.v1 import vae_pb2, vae_pb2_grpc

    model = load_model_config("Wan2.1-T2V-1.3B")
    latents = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    expected = VaeEngine.random(model.vae, "cuda:0").decode(latents.to("cuda:0"))[0].cpu()

    async def main():
        system = SystemConfig(torch.device("cuda", 1), torch.bfloat16)
        server, port = await vae_server.start(model, None, system, "127.0.0.1:0")
        try:
            async with create_channel(f"127.0.0.1:{port}") as channel:
                requests = [vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(
                    output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)),
                    *tensor_to_messages(latents, vae_pb2.DecodeRequest, "latents")]
                return [m async for m in vae_pb2_grpc.VaeServiceStub(channel).Decode(iter(requests))]
        finally:
            await server.stop(0)

    torch.cuda.set_device(0)
    out = asyncio.run(main())
    frames = frames_to_tensor([m.frames for m in out if m.WhichOneof("frame") == "frames"])
    assert torch.equal(frames, expected)
