"""The client library's `generate` against a gateway whose response stream breaks gateway.proto's contract: a
clear error, never a partial result taken for a whole one (and the CLI prints it in one line)."""

import asyncio

import grpc
import pytest
import torch

from smartdiff.gateway.v1 import gateway_pb2 as pb
from smartdiff.gateway.v1 import gateway_pb2_grpc as pb_grpc
from smartdiff.services.gateway.cli import main
from smartdiff.services.gateway.client import ResponseError, generate
from smartdiff.shared.errors import TensorStreamError
from smartdiff.shared.grpc_server import create_channel
from smartdiff.shared.tensor_stream import tensor_to_messages
from smartdiff.vae.v1 import vae_pb2

from grpc_test_server import serving

MP4 = torch.frombuffer(bytearray(b"\x00\x00\x00\x18ftypisom" + bytes(20)), dtype=torch.uint8)
SUMMARY = pb.GenerateResponse(summary=pb.GenerateSummary(request_id="r"))


def video(kind="mp4", tensor=MP4):
    return list(tensor_to_messages(tensor, pb.GenerateResponse, kind))


STREAMS = {  # prompt -> what the fake gateway answers
    "ok": video() + [SUMMARY],
    "no_summary": video(),
    "summary_only": [SUMMARY],
    "empty_message": [pb.GenerateResponse()] + video() + [SUMMARY],
    "after_summary": [SUMMARY] + video(),
    "two_summaries": video() + [SUMMARY, SUMMARY],
    "frames_not_asked": video() + video("frames", torch.zeros(1, 2, 2, 3, dtype=torch.uint8)) + [SUMMARY],
    "latents_not_asked": video() + video("latents", torch.zeros(1, 16, 1, 2, 2)) + [SUMMARY],
    "mp4_of_floats": video("mp4", torch.zeros(3, 4)) + [SUMMARY],
    "cut_short": video()[:1] + [SUMMARY],
}


async def fake_generate(request, context):
    for msg in STREAMS[request.prompt]:
        yield msg


async def fake_gateway():
    """A server answering Generate with STREAMS[prompt]; returns (server, port)."""
    return await serving("smartdiff.gateway.v1.GatewayService", {
        "Generate": grpc.unary_stream_rpc_method_handler(
            fake_generate, request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString)})


def run(prompt, **request):
    async def main_():
        server, port = await fake_gateway()
        try:
            async with create_channel(f"127.0.0.1:{port}") as channel:
                return await generate(pb_grpc.GatewayServiceStub(channel), pb.GenerateRequest(prompt=prompt, **request))
        finally:
            await server.stop(0)

    return asyncio.run(main_())


def test_a_whole_response_is_returned():
    outcome = run("ok")
    assert outcome.video == MP4.numpy().tobytes() and outcome.summary.request_id == "r" and outcome.latents is None


@pytest.mark.parametrize("prompt,error,words", [
    ("no_summary", ResponseError, "ended without its summary"),
    ("summary_only", TensorStreamError, "mp4: required"),
    ("empty_message", ResponseError, "unexpected empty message in the response"),
    ("after_summary", ResponseError, "mp4 message after the summary"),
    ("two_summaries", ResponseError, "summary message after the summary"),
    ("frames_not_asked", ResponseError, "unexpected frames message in the response; asked for: mp4"),
    ("latents_not_asked", ResponseError, "unexpected latents message in the response; asked for: mp4"),
    ("mp4_of_floats", ResponseError, "mp4 must be torch.uint8 with 1 dims"),
    ("cut_short", TensorStreamError, "stream ended before the end frame"),
])
def test_a_broken_response_is_an_error_not_a_partial_result(prompt, error, words):
    with pytest.raises(error, match=words):
        run(prompt)


def test_latents_asked_for_and_missing_are_an_error():
    with pytest.raises(TensorStreamError, match="latents: required"):
        run("ok", return_latents=True)
    with pytest.raises(ResponseError, match="unexpected mp4 message in the response; asked for: frames"):
        run("ok", output_format=vae_pb2.OUTPUT_FORMAT_FRAMES)


@pytest.mark.parametrize("prompt", ["no_summary", "cut_short"])
def test_the_cli_prints_a_broken_response_in_one_line(prompt, tmp_path, capsys):
    async def serve_and_run():
        server, port = await fake_gateway()
        try:
            return await asyncio.to_thread(main, ["generate", "--gateway", f"127.0.0.1:{port}", "--prompt", prompt,
                                                  "--out", str(tmp_path / "v.mp4")])
        finally:
            await server.stop(0)

    assert asyncio.run(serve_and_run()) == 1
    err = capsys.readouterr().err
    assert "error: the gateway's response is unusable: " in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()
