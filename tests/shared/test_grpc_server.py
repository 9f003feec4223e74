"""StageServer: health SERVING only when marked, reflection, explicit size limits, tensors over real gRPC."""

import asyncio

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smartdiff.denoiser.v1 import denoiser_pb2
from smartdiff.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: F401 - the gateway descriptors in the pool
from smartdiff.shared.grpc_server import StageServer, create_channel
from smartdiff.shared.tensor_stream import TensorAssembler, tensor_to_frames
from smartdiff.tensor.v1 import tensor_pb2

from grpc_test_server import serving

GATEWAY = "smartdiff.gateway.v1.GatewayService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


def test_health_is_serving_only_after_mark_serving():
    async def run():
        server = StageServer([GATEWAY])
        port = server.add_port("127.0.0.1:0")
        await server.start()
        seen = []
        async with create_channel(f"127.0.0.1:{port}") as channel:
            seen.append((await health_of(channel), await health_of(channel, GATEWAY)))
            await server.mark_serving()  # weights loaded, warm-up ran
            seen.append((await health_of(channel), await health_of(channel, GATEWAY)))
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=GATEWAY))
            seen.append((await watch.read()).status)
            stopping = asyncio.ensure_future(server.stop(grace=0.5))
            seen.append((await watch.read()).status)  # graceful stop reports NOT_SERVING first
            await stopping
        return seen

    seen = asyncio.run(run())
    assert seen == [
        (NOT_SERVING, NOT_SERVING),
        (SERVING, SERVING),
        SERVING,
        NOT_SERVING,
    ]


def test_reflection_lists_and_describes_the_service():
    async def run():
        server = StageServer([GATEWAY])
        port = server.add_port("127.0.0.1:0")
        await server.start()
        try:
            async with create_channel(f"127.0.0.1:{port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                requests = [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=GATEWAY),
                ]
                return [r async for r in stub.ServerReflectionInfo(iter(requests))]
        finally:
            await server.stop(0)

    listed, described = asyncio.run(run())
    names = {s.name for s in listed.list_services_response.service}
    assert {GATEWAY, "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # clients in any language can discover it


ECHO = "smartdiff.test.TensorEcho"


async def echo_tensor(request_iterator, context):
    """Assemble the incoming tensor, then stream it back."""
    assembler = TensorAssembler("tensor")
    async for frame in request_iterator:
        assembler.feed(frame)
    for frame in tensor_to_frames(assembler.result(), "echo"):
        yield frame


async def with_echo_server(body, max_message_bytes):
    server = StageServer([ECHO], max_message_bytes=max_message_bytes)
    server.server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                ECHO,
                {
                    "Echo": grpc.stream_stream_rpc_method_handler(
                        echo_tensor,
                        request_deserializer=tensor_pb2.TensorFrame.FromString,
                        response_serializer=tensor_pb2.TensorFrame.SerializeToString,
                    ),
                },
            )
        ]
    )
    port = server.add_port("127.0.0.1:0")
    await server.start()
    try:
        async with create_channel(f"127.0.0.1:{port}", max_message_bytes=max_message_bytes) as channel:
            echo = channel.stream_stream(
                f"/{ECHO}/Echo",
                request_serializer=tensor_pb2.TensorFrame.SerializeToString,
                response_deserializer=tensor_pb2.TensorFrame.FromString,
            )
            return await body(echo)
    finally:
        await server.stop(0)


def test_bf16_tensor_round_trips_over_grpc():
    x = torch.randn(3, 1000, 600).to(torch.bfloat16)  # 3.4 MiB: four 1 MiB chunks each way

    async def body(echo):
        assembler = TensorAssembler("echo")
        async for frame in echo(tensor_to_frames(x, "x"), timeout=30):
            assembler.feed(frame)
        return assembler.result()

    y = asyncio.run(with_echo_server(body, max_message_bytes=2 << 20))
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))


def test_message_size_limit_is_enforced():
    x = torch.zeros(1 << 20, dtype=torch.uint8)  # one 1 MiB chunk: over a 64 KiB limit

    async def body(echo):
        try:
            async for _ in echo(tensor_to_frames(x), timeout=10):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()

    assert (
        asyncio.run(with_echo_server(body, max_message_bytes=64 << 10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )


async def serving_slow(slow, **options):
    """A SERVING StageServer with the unary-stream handler `slow` as /test.Slow/Run -> (server, port)."""
    return await serving("test.Slow", {"Run": grpc.unary_stream_rpc_method_handler(slow)}, **options)


def test_drain_serves_on_until_no_call_is_left_then_stops():
    """SIGTERM's drain: health watchers see NOT_SERVING at once; the call in flight streams to its end (a late
    call is still served: clients that watch health have stopped sending); the drain ends LINGER after the last
    call, not at its grace, although a health watch is still open."""
    from smartdiff.shared.grpc_server import LINGER

    release = asyncio.Event()

    async def slow(request, context):
        yield b"started"
        await release.wait()
        yield b"done" * 1_000_000  # a large last message must reach the client whole

    async def run():
        server, port = await serving_slow(slow)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=GATEWAY))
            seen = [(await watch.read()).status]
            method = channel.unary_stream("/test.Slow/Run")
            first = method(b"")
            assert await first.read() == b"started"
            assert server.in_flight.count == 1
            drain = asyncio.ensure_future(server.drain(30))
            seen.append((await watch.read()).status)
            late = method(b"")
            assert await late.read() == b"started"
            assert not drain.done()
            loop = asyncio.get_running_loop()
            release.set()
            rest = [len(await first.read()), await first.read(), len(await late.read()), await late.read()]
            ended = loop.time()
            await asyncio.wait_for(drain, 10)
        return seen, rest, server.in_flight.count, loop.time() - ended

    seen, rest, in_flight, after = asyncio.run(run())
    assert seen == [SERVING, NOT_SERVING]
    assert rest == [4_000_000, grpc.aio.EOF, 4_000_000, grpc.aio.EOF] and in_flight == 0
    assert LINGER - 0.1 <= after < LINGER + 2


def test_call_limit_counts_work_only_and_refuses_past_it_at_once():
    """max_calls bounds the calls in flight; health watches (one per client channel with client-side health
    checking) neither count nor are refused, so they cannot lock work out, as gRPC's maximum_concurrent_rpcs did."""
    release = asyncio.Event()

    async def slow(request, context):
        yield b"started"
        await release.wait()
        yield b"done"

    async def run():
        server, port = await serving_slow(slow, max_calls=2)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=GATEWAY))
                       for _ in range(5)]
            assert [(await w.read()).status for w in watches] == [SERVING] * 5
            method = channel.unary_stream("/test.Slow/Run")
            held = [method(b""), method(b"")]
            assert [await c.read() for c in held] == [b"started"] * 2  # two calls in flight beside five watches
            try:
                await method(b"").read()
                refused = None
            except grpc.aio.AioRpcError as e:
                refused = (e.code(), e.details())
            release.set()
            assert [await c.read() for c in held] == [b"done"] * 2
            await asyncio.sleep(0.1)
            after = [m async for m in method(b"")]  # the slots are free again
            for w in watches:
                w.cancel()
        await server.stop(0)
        return refused, after

    refused, after = asyncio.run(run())
    assert refused == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Slow: 2 calls in flight (limit 2); retry later")
    assert after == [b"started", b"done"]


def test_a_request_stream_that_pauses_loses_its_call():
    """A client that sends part of its upload and stops (stalled, or gone without closing) gets DEADLINE_EXCEEDED
    once no message came for the idle limit, instead of holding a call slot for good."""
    from smartdiff.shared.errors import grpc_errors
    from smartdiff.shared.tensor_stream import read_params_and_tensors

    @grpc_errors
    async def upload(request_iterator, context):
        await read_params_and_tensors(request_iterator, {"prompt_embeds": TensorAssembler("prompt_embeds")},
                                      idle_seconds=0.5)
        yield b"read"

    async def run():
        server, port = await serving("test.Upload", {"Run": grpc.stream_stream_rpc_method_handler(
            upload, request_deserializer=denoiser_pb2.DenoiseRequest.FromString)})
        async with create_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/test.Upload/Run",
                                         request_serializer=denoiser_pb2.DenoiseRequest.SerializeToString)()
            await call.write(denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(steps=1)))
            start = asyncio.get_running_loop().time()
            with_error = None
            try:
                await asyncio.wait_for(call.read(), 10)
            except grpc.aio.AioRpcError as e:
                with_error = (e.code(), e.details(), asyncio.get_running_loop().time() - start)
            count = server.in_flight.count
        await server.stop(0)
        return with_error, count

    (code, details, waited), count = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details.startswith("request stream: no message for 0.5 s")
    assert 0.4 < waited < 5 and count == 0


def _upload(chunks: int = 8):
    """A client's request stream: a params frame, then `chunks` frames of 1 MiB, as a stage's uploads are sent."""
    yield denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(steps=1))
    for frame in tensor_to_frames(torch.zeros(chunks << 18)):  # float32: 4 bytes per element
        yield denoiser_pb2.DenoiseRequest(prompt_embeds=frame)


async def _codes_of_uploads(port: int, method: str, times: int) -> set:
    codes = set()
    async with create_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(method, request_serializer=denoiser_pb2.DenoiseRequest.SerializeToString)
        for _ in range(times):
            try:
                [m async for m in call(_upload())]
                codes.add("OK")
            except grpc.aio.AioRpcError as e:
                codes.add((e.code(), e.details()))
    return codes


async def serving_held_uploads(release: asyncio.Event):
    """A server of one call at a time whose /test.Slow/Run reads its upload, answers b"started", holds until
    `release` is set, then answers b"done" -> (server, port)."""
    async def held(request_iterator, context):
        async for _ in request_iterator:
            pass
        yield b"started"
        await release.wait()
        yield b"done"

    return await serving("test.Slow", {"Run": grpc.stream_stream_rpc_method_handler(held)}, max_calls=1)


def test_a_call_refused_during_its_upload_gets_its_own_status():
    """A stage that is full refuses a call while the client is still streaming tensors to it: the client must read
    RESOURCE_EXHAUSTED (retry later), not the INTERNAL that gRPC reports when a status goes out mid-upload."""
    release = asyncio.Event()

    async def run():
        server, port = await serving_held_uploads(release)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            held = channel.stream_stream("/test.Slow/Run")(iter([b""]))
            assert await held.read() == b"started"
            codes = await _codes_of_uploads(port, "/test.Slow/Run", 5)
            draining = server.in_flight.draining  # the refused uploads were read to their end, and are done
            release.set()
        await server.stop(0)
        return codes, draining

    codes, draining = asyncio.run(run())
    assert codes == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "Slow: 1 calls in flight (limit 1); retry later")}
    assert draining == 0


def test_a_handler_that_fails_on_the_first_message_reports_its_error_mid_upload():
    """A stage handler that rejects a request on its first message (here its params) while the client is still
    uploading: the client reads that INVALID_ARGUMENT and its message."""
    from smartdiff.shared.errors import RequestError, grpc_errors

    @grpc_errors
    async def strict(request_iterator, context):
        async for msg in request_iterator:
            raise RequestError("params.steps", f"{msg.params.steps} is too few for this test")
        yield b"never"

    async def run():
        server, port = await serving("test.Strict", {"Run": grpc.stream_stream_rpc_method_handler(
            strict, request_deserializer=denoiser_pb2.DenoiseRequest.FromString)})
        codes = await _codes_of_uploads(port, "/test.Strict/Run", 5)
        await server.stop(0)
        return codes

    assert asyncio.run(run()) == {(grpc.StatusCode.INVALID_ARGUMENT, "params.steps: 1 is too few for this test")}


def test_bytes_that_are_not_a_valid_message_are_invalid_argument():
    """A request that does not decode (bad UTF-8 in a string field; a corrupt wire format in a stream) gets
    INVALID_ARGUMENT naming the message type, with or without `grpc_errors` on the handler; the server goes on
    serving valid requests."""
    from smartdiff.shared.errors import grpc_errors

    async def one(request, context):
        yield request.prompt.encode()

    async def upload(request_iterator, context):
        yield str(len([m async for m in request_iterator])).encode()

    async def run():
        decode = {"request_deserializer": gateway_pb2.GenerateRequest.FromString}
        server, port = await serving("test.Decode", {
            "One": grpc.unary_stream_rpc_method_handler(one, **decode),
            "Upload": grpc.stream_stream_rpc_method_handler(upload, **decode),
            "Mapped": grpc.stream_stream_rpc_method_handler(grpc_errors(upload), **decode)})
        bad_utf8 = bytes([0x0A, 0x02, 0xFF, 0xFE])  # field 1 (prompt), a string of two bytes that are not UTF-8
        corrupt = bytes([0x0A, 0x09, 0x41])  # field 1 says 9 bytes follow; one does
        good = gateway_pb2.GenerateRequest(prompt="fox").SerializeToString()
        results = []
        async with create_channel(f"127.0.0.1:{port}") as channel:
            calls = [(channel.unary_stream("/test.Decode/One"), bad_utf8)] + [
                (channel.stream_stream(f"/test.Decode/{m}"), iter([good, corrupt, good])) for m in ("Upload", "Mapped")]
            for call, request in calls:
                try:
                    results.append([m async for m in call(request)])
                except grpc.aio.AioRpcError as e:
                    results.append((e.code(), e.details()))
            results.append([m async for m in channel.unary_stream("/test.Decode/One")(good)])
        await server.stop(0)
        return results

    *errors, ok = asyncio.run(run())
    assert ok == [b"fox"]
    for (code, details), problem in zip(errors, ["String field had bad UTF-8", "corrupt", "corrupt"]):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("request: not a valid message: ") and problem in details
        assert "smartdiff.gateway.v1.GenerateRequest" in details


def test_an_early_error_keeps_its_status_when_the_rest_of_the_upload_does_not_decode():
    """The rest of an upload is read before an early error's status goes out; a message in it that does not
    decode ends that reading, and the client still gets the error that was due, not INVALID_ARGUMENT."""
    from smartdiff.shared.errors import Overloaded, grpc_errors

    @grpc_errors
    async def full(request_iterator, context):
        async for _ in request_iterator:
            raise Overloaded("Full: no room for this test; retry later")
        yield b"never"

    async def run():
        server, port = await serving("test.Full", {"Run": grpc.stream_stream_rpc_method_handler(
            full, request_deserializer=gateway_pb2.GenerateRequest.FromString)})
        good = gateway_pb2.GenerateRequest(prompt="fox").SerializeToString()
        async with create_channel(f"127.0.0.1:{port}") as channel:
            try:
                [m async for m in channel.stream_stream("/test.Full/Run")(iter([good, good, b"\x0a\x09\x41"]))]
                result = "OK"
            except grpc.aio.AioRpcError as e:
                result = (e.code(), e.details())
        await server.stop(0)
        return result

    assert asyncio.run(run()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Full: no room for this test; retry later")


def test_a_drain_waits_for_refused_uploads_to_get_their_status():
    """SIGTERM while a refused call's upload is still being read: the drain waits for it, so its client gets
    RESOURCE_EXHAUSTED (retry elsewhere), not the UNAVAILABLE of a server that stopped under it."""
    release = asyncio.Event()

    async def slow_upload():
        for _ in range(6):
            yield b"x" * 1000
            await asyncio.sleep(0.2)

    async def run():
        server, port = await serving_held_uploads(release)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            method = channel.stream_stream("/test.Slow/Run")
            held = method(iter([b""]))
            assert await held.read() == b"started"
            refused = method(slow_upload())
            reading = asyncio.ensure_future(refused.read())
            while not server.in_flight.draining:
                await asyncio.sleep(0.01)
            release.set()  # the held call ends at once: only the refused upload keeps the drain going
            assert await held.read() == b"done"
            await server.drain(30)
            try:
                await reading
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code()

    assert asyncio.run(run()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_second_server_on_a_port_in_use_is_refused_not_sharing_it():
    """gRPC's default SO_REUSEPORT would let a second server bind the port and take part of its traffic."""
    import pytest

    from smartdiff.shared.config import ConfigError
    from smartdiff.shared.grpc_server import check_address

    async def main():
        first = StageServer(["smartdiff.test.v1.First"])
        port = first.add_port("127.0.0.1:0")
        await first.start()
        try:
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
                StageServer(["smartdiff.test.v1.Second"]).add_port(f"127.0.0.1:{port}")
            with pytest.raises(ConfigError, match="the port is in use"):
                await check_address(f"127.0.0.1:{port}")
        finally:
            await first.stop(0)
        await check_address(f"127.0.0.1:{port}")  # free again

    asyncio.run(main())


def test_checking_a_free_fixed_port_leaves_it_free_for_the_server():
    """The check before the weights load must let the port go: a stage on a fixed port (the manifests' 50050..)
    binds it right after."""
    import socket

    from smartdiff.shared.grpc_server import check_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        await check_address(f"127.0.0.1:{port}")
        server = StageServer(["smartdiff.test.v1.Fixed"])
        assert server.add_port(f"127.0.0.1:{port}") == port
        await server.start()
        await server.stop(0)

    asyncio.run(main())


def test_a_call_quiet_for_many_client_pings_is_not_cut_for_too_many_pings(monkeypatch):
    """Our channels ping every CALL_PING_MS while a call is in flight; the server must accept pings that often
    when it sends nothing (a long denoising step), or it answers GOAWAY "too many pings" after two of them. Here
    the intervals are shrunk 20-fold, so the call stays quiet for ~6 of the client's pings."""
    from smartdiff.shared import grpc_server

    monkeypatch.setattr(grpc_server, "CALL_PING_MS", 1000)
    monkeypatch.setattr(grpc_server, "MIN_PING_INTERVAL_MS", 500)

    async def quiet(request, context):
        yield b"started"
        await asyncio.sleep(6.5)
        yield b"done"

    async def run():
        server, port = await serving_slow(quiet)
        try:
            async with create_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream("/test.Slow/Run")(b"")
                return [m async for m in call]
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == [b"started", b"done"]
