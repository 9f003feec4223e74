"""Errors -> status codes over a loopback grpc.aio server: right code, field/stage named, no traceback."""

import asyncio
import logging

import grpc
import pytest

from smartdiff.shared import errors
from smartdiff.shared.grpc_server import StageServer, create_channel

SERVICE = "smartdiff.test.Faulty"

FAULTS = {
    b"request": errors.RequestError("width", "must be a multiple of 16"),
    b"data_loss": errors.TensorStreamError(grpc.StatusCode.DATA_LOSS, "latents: CRC32 mismatch"),
    b"bad_spec": errors.TensorStreamError(grpc.StatusCode.INVALID_ARGUMENT, "latents: unknown dtype 99"),
    b"stage": errors.StageUnavailable("denoiser", "connection refused"),
    b"overload": errors.Overloaded("queue full (8 waiting)"),
    b"cancelled": errors.Cancelled(),
    b"deadline": errors.DeadlineExceeded(),
    b"timeout": TimeoutError("took too long"),
    b"bug": RuntimeError("secret path /srv/weights leaked"),
}
EXPECTED = {
    b"request": (grpc.StatusCode.INVALID_ARGUMENT, "width: must be a multiple of 16"),
    b"data_loss": (grpc.StatusCode.DATA_LOSS, "CRC32"),
    b"bad_spec": (grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    b"stage": (grpc.StatusCode.UNAVAILABLE, "stage denoiser unavailable"),
    b"overload": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
    b"cancelled": (grpc.StatusCode.CANCELLED, "cancelled"),
    b"deadline": (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    b"timeout": (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    b"bug": (grpc.StatusCode.INTERNAL, "internal error (id "),
}


class Faulty:
    """A tiny servicer on raw bytes: the request names the fault to raise."""

    def __init__(self):
        self.cancelled = asyncio.Event()

    @errors.grpc_errors
    async def Unary(self, request, context):
        if request == b"abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "explicit abort")
        if request == b"down_stage":
            async with create_channel("127.0.0.1:1") as channel:  # nothing listens on port 1
                with errors.calling_stage("vae"):
                    await channel.unary_unary("/x.Y/Z")(b"", timeout=5)
        if request == b"deadline_left":
            left = context.time_remaining()  # what the gateway passes on to its stage calls
            return b"none" if left is None else str(left).encode()
        raise FAULTS[request]

    @errors.grpc_errors
    async def Stream(self, request, context):
        yield b"first"
        if request == b"slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        raise FAULTS[request]


async def with_server(body):
    servicer = Faulty()
    server = StageServer([SERVICE])
    server.server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(servicer.Unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(servicer.Stream),
                },
            )
        ]
    )
    port = server.add_port("127.0.0.1:0")
    await server.start()
    try:
        async with create_channel(f"127.0.0.1:{port}") as channel:
            return await body(channel, servicer)
    finally:
        await server.stop(0)


async def call_unary(channel, request: bytes):
    try:
        return await channel.unary_unary(f"/{SERVICE}/Unary")(request, timeout=10)
    except grpc.aio.AioRpcError as e:
        return e


def check_status(err, code, words):
    assert isinstance(err, grpc.aio.AioRpcError), err
    assert err.code() == code, (err.code(), err.details())
    assert words in err.details()
    assert "Traceback" not in err.details() and 'File "' not in err.details()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_unary_errors_map_to_status(fault, caplog):
    err = asyncio.run(with_server(lambda ch, _: call_unary(ch, fault)))
    check_status(err, *EXPECTED[fault])
    if fault == b"bug":
        assert "secret" not in err.details() and "RuntimeError" not in err.details()
        record = next(r for r in caplog.records if "internal error" in r.getMessage())
        assert record.levelno == logging.ERROR and record.exc_info  # traceback stays in the server log


@pytest.mark.parametrize("fault", [b"request", b"stage", b"bug"])
def test_stream_errors_after_a_message(fault):
    async def body(channel, _):
        call = channel.unary_stream(f"/{SERVICE}/Stream")(fault, timeout=10)
        got = []
        try:
            async for msg in call:
                got.append(msg)
        except grpc.aio.AioRpcError as e:
            return got, e

    got, err = asyncio.run(with_server(body))
    assert got == [b"first"]
    check_status(err, *EXPECTED[fault])


def test_explicit_abort_passes_through():
    err = asyncio.run(with_server(lambda ch, _: call_unary(ch, b"abort")))
    check_status(err, grpc.StatusCode.NOT_FOUND, "explicit abort")


def test_down_stage_is_unavailable_naming_it():
    err = asyncio.run(with_server(lambda ch, _: call_unary(ch, b"down_stage")))
    check_status(err, grpc.StatusCode.UNAVAILABLE, "stage vae unavailable")


def test_deadline_is_visible_to_the_handler_for_propagation():
    async def body(channel, _):
        with_deadline = await channel.unary_unary(f"/{SERVICE}/Unary")(b"deadline_left", timeout=7)
        without = await channel.unary_unary(f"/{SERVICE}/Unary")(b"deadline_left")
        return float(with_deadline), without

    left, without = asyncio.run(with_server(body))
    assert 0 < left <= 7.5 and without == b"none"  # the wire encoding of grpc-timeout rounds up a little


def test_client_cancel_reaches_the_handler_and_is_not_mapped():
    async def body(channel, servicer):
        call = channel.unary_stream(f"/{SERVICE}/Stream")(b"slow", timeout=10)
        assert await call.read() == b"first"
        call.cancel()
        await asyncio.wait_for(servicer.cancelled.wait(), 5)
        return await call.code()

    assert asyncio.run(with_server(body)) == grpc.StatusCode.CANCELLED


def test_stage_error_passes_user_faults_on_and_hides_others():
    class Fake(grpc.RpcError):
        def __init__(self, code, details):
            self._c, self._d = code, details

        def code(self):
            return self._c

        def details(self):
            return self._d

    bad = errors.stage_error("denoiser", Fake(grpc.StatusCode.INVALID_ARGUMENT, "params.steps: must be >= 1"))
    assert (
        bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.message == "denoiser: params.steps: must be >= 1"
    )
    busy = errors.stage_error("denoiser", Fake(grpc.StatusCode.RESOURCE_EXHAUSTED, "denoiser: 8 requests in flight"))
    assert busy.message == "denoiser: 8 requests in flight"  # the stage named once
    hidden = errors.stage_error(
        "vae", Fake(grpc.StatusCode.UNKNOWN, "Traceback (most recent call last): ...")
    )
    assert (
        hidden.code == grpc.StatusCode.INTERNAL
        and "Traceback" not in hidden.message
        and "vae" in hidden.message
    )
    internal = errors.stage_error("vae", Fake(grpc.StatusCode.INTERNAL, "internal error (id 0123abcd); see the log"))
    assert internal.code == grpc.StatusCode.INTERNAL  # our services' INTERNAL messages are safe: the id goes on
    assert internal.message == "stage vae failed: internal error (id 0123abcd); see the log"
    assert "Traceback" not in errors.stage_error("vae", Fake(grpc.StatusCode.INTERNAL, "Traceback (most ...")).message
    # a tensor the gateway built from another stage's output, refused: that stage's failure, not the client's
    overflow = errors.stage_error("vae", Fake(grpc.StatusCode.INVALID_ARGUMENT, "latents: the decode overflowed"))
    assert overflow.code == grpc.StatusCode.INTERNAL and overflow.message == "vae: latents: the decode overflowed"
    assert errors.stage_error("denoiser", Fake(grpc.StatusCode.INVALID_ARGUMENT,
                                               "negative_prompt_embeds: required")).code == grpc.StatusCode.INTERNAL
    # the gateway refused the client's own unknown fields: a stage refusing some means their protos differ
    skew = errors.stage_error("vae", Fake(grpc.StatusCode.INVALID_ARGUMENT, "params: unknown field number 12 in x"))
    assert skew.code == grpc.StatusCode.FAILED_PRECONDITION and "different API versions" in skew.message
