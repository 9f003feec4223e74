"""Build grpc.aio servers and channels alike for every stage: message limits, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from google.protobuf.message import DecodeError

from smartdiff.shared import metrics
from smartdiff.shared.config import ConfigError
from smartdiff.shared.errors import RequestError, drain_requests

log = logging.getLogger(__name__)

# Tensors travel in ~1 MiB chunks, so no message comes near this; it bounds what a peer can make us buffer.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


def message_size_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Explicit send/receive limits, used by servers and channels alike."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


KEEPALIVE_MS = 60_000  # how often a server pings each client connection
# How often our channels ping the server while a call is in flight, and how long a ping may go unanswered
# (create_channel); the most often a server accepts pings from a client that it sends nothing (gRPC's default,
# 5 minutes, would answer those pings during a long denoising step with GOAWAY "too many pings").
CALL_PING_MS = 20_000
CALL_PING_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000


def ping_timeout_options(ms: int) -> list[tuple[str, int]]:
    """How long a keepalive ping may go unanswered before the connection is closed: gRPC 1.85 takes the ping's
    timeout from grpc.http2.ping_timeout_ms (default 60 s), not only from grpc.keepalive_timeout_ms."""
    return [("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms)]


# gRPC listens with SO_REUSEPORT by default: a second server started on a port in use would share its traffic
# without a word. Off, the second one fails to start instead.
NO_PORT_SHARING = ("grpc.so_reuseport", 0)


# How long a drain waits with no call in flight before it stops: the last response's bytes reach its client.
LINGER = 1.0
# Not counted as work: health (a Watch stays open for as long as its client watches) and reflection.
_CONTROL_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _kind(handler: grpc.RpcMethodHandler) -> str:
    """The name of the handler's behavior attribute: unary_unary, unary_stream, stream_unary or stream_stream."""
    return (f"{'stream' if handler.request_streaming else 'unary'}_"
            f"{'stream' if handler.response_streaming else 'unary'}")


async def _each(responses):
    """A response-streaming behavior's messages: from an async generator, or none from a coroutine that writes
    through context.write."""
    if hasattr(responses, "__aiter__"):
        async for msg in responses:
            yield msg
    else:
        await responses


class InFlight(grpc.aio.ServerInterceptor):
    """Counts a server's calls: `count` in flight (what a drain waits for), `total` started; past `limit` calls in
    flight, a new one is refused with RESOURCE_EXHAUSTED. Health and reflection calls are neither counted nor
    refused: gRPC's own maximum_concurrent_rpcs counts them, so clients' health watches (one per channel and
    replica) could fill it and lock all work out. Each call's status code and duration go to the process's
    metrics (shared/metrics.py), refused calls included."""

    # Refused uploads read to their end at once, at most; past that a refusal goes out mid-upload (and may reach
    # its client as INTERNAL): a flood of refused calls cannot make the server read for all of them.
    MAX_DRAINING = 16

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.count = 0
        self.total = 0
        self.draining = 0  # refused calls whose upload is being read before their status goes out

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_CONTROL_PREFIXES):
            return handler
        _, full_service, method = details.method.split("/")
        service = full_service.rsplit(".", 1)[-1]
        wrap = self._streaming if handler.response_streaming else self._unary
        return handler._replace(**{_kind(handler): wrap(getattr(handler, _kind(handler)), service, method)})

    async def _admit(self, request, context, service: str) -> None:
        if self.limit is not None and self.count >= self.limit:
            if hasattr(request, "__aiter__") and self.draining < self.MAX_DRAINING:  # the status reaches its
                self.draining += 1  # client after the upload
                try:
                    await drain_requests(request)
                finally:
                    self.draining -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{service}: {self.count} calls in flight (limit {self.limit}); retry later")
        self.count += 1
        self.total += 1

    def _unary(self, behavior, service: str, method: str):
        async def call(request, context):
            with _measured(context, service, method):
                await self._admit(request, context, service)
                try:
                    return await behavior(request, context)
                finally:
                    self.count -= 1
        return call

    def _streaming(self, behavior, service: str, method: str):
        async def call(request, context):
            with _measured(context, service, method):
                await self._admit(request, context, service)
                try:
                    async for msg in _each(behavior(request, context)):
                        yield msg
                finally:
                    self.count -= 1
        return call


@contextmanager
def _measured(context: grpc.aio.ServicerContext, service: str, method: str) -> Iterator[None]:
    """One call in the metrics: in flight while it runs, then its duration and status code."""
    start = time.perf_counter()
    metrics.IN_FLIGHT.labels(service).inc()
    code = grpc.StatusCode.UNKNOWN  # an exception that is not a status: gRPC reports UNKNOWN
    try:
        yield
        code = context.code() or grpc.StatusCode.OK
    except grpc.aio.AbortError:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or its deadline passed
        code = grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
        raise
    finally:
        metrics.IN_FLIGHT.labels(service).dec()
        metrics.CALLS.labels(service, method, code.name).inc()
        metrics.CALL_SECONDS.labels(service, method).observe(time.perf_counter() - start)


# gRPC cancels a handler whose deadline passed a few milliseconds before its own clock says so (measured: 6-7 ms
# left in 3 of 20 calls): a cancellation this close to the deadline is the deadline.
DEADLINE_SLACK = 0.05


def _expired(context: grpc.aio.ServicerContext) -> bool:
    left = context.time_remaining()
    return left is not None and left <= DEADLINE_SLACK


class DecodeRequests(grpc.aio.ServerInterceptor):
    """Decode request messages inside the handler's call, so bytes that are not a valid message (corrupt wire
    format, a string field with bad UTF-8) get INVALID_ARGUMENT naming the message type, not gRPC's UNKNOWN."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        decode = getattr(handler, "request_deserializer", None)
        if decode is None or details.method.startswith(_CONTROL_PREFIXES):
            return handler
        behavior = getattr(handler, _kind(handler))

        async def messages(raw_iterator):  # a request stream's messages, decoded as the handler reads them
            async for raw in raw_iterator:
                try:
                    msg = decode(raw)
                except DecodeError as e:
                    await drain_requests(raw_iterator)
                    raise Undecodable(e) from None
                yield msg

        def request(raw):
            if handler.request_streaming:
                return messages(raw)
            try:
                return decode(raw)
            except DecodeError as e:
                raise Undecodable(e) from None

        # Undecodable reaches here from a unary request, or from a stream whose handler does not map errors.
        if handler.response_streaming:
            async def call(raw, context):
                try:
                    async for msg in _each(behavior(request(raw), context)):
                        yield msg
                except Undecodable as e:
                    await context.abort(e.code, e.message)
        else:
            async def call(raw, context):
                try:
                    return await behavior(request(raw), context)
                except Undecodable as e:
                    await context.abort(e.code, e.message)
        return handler._replace(request_deserializer=None, **{_kind(handler): call})


class Undecodable(RequestError):
    def __init__(self, error: DecodeError) -> None:  # protobuf's text names the message type
        super().__init__("request", f"not a valid message: {error}")


class StageServer:
    """A grpc.aio server with health (NOT_SERVING until `mark_serving`) and reflection for its services.

    Usage: `s = StageServer(["smartdiff.vae.v1.VaeService"])`;
    `add_VaeServiceServicer_to_server(svc, s.server)`;
    `port = s.add_port("[::]:50051")`; `await s.start()`; load weights and warm up; `await s.mark_serving()`;
    ...; `await s.stop(grace=10)`.
    """

    def __init__(
        self,
        service_names: Sequence[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_calls: int | None = None,
        options: Sequence[tuple[str, object]] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        # Past max_calls in flight (health and reflection aside), a call is refused with RESOURCE_EXHAUSTED.
        self.in_flight = InFlight(max_calls)
        self.server = grpc.aio.server(
            options=[*message_size_options(max_message_bytes),
                     # Clients reconnect (and re-resolve DNS, picking up new replicas) every 5 minutes; calls in
                     # flight on an old connection are never cut (no max_connection_age_grace).
                     ("grpc.max_connection_age_ms", 300_000),
                     # A client that vanished without closing its connection (host down, network cut) is found by
                     # an unanswered ping within ~80 s, and its calls are cancelled, freeing their slots.
                     ("grpc.keepalive_time_ms", KEEPALIVE_MS), *ping_timeout_options(20_000),
                     ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
                     NO_PORT_SHARING, *options],
            interceptors=[self.in_flight, DecodeRequests(), *interceptors],
        )
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
            self.server,
        )

    def add_port(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on `address` ("[::]:0" picks a free port); returns the bound port. ConfigError when it cannot."""
        return _listen(self.server, address, credentials)

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:  # "" is the whole server, as Kubernetes probes ask
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start accepting RPCs, reporting NOT_SERVING until `mark_serving`."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def mark_serving(self) -> None:
        """Call after the weights are loaded and a warm-up ran."""
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", ", ".join(self.service_names))

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING for good, then let in-flight RPCs finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def drain(self, grace: float) -> None:
        """SIGTERM: NOT_SERVING for good (health watchers, such as the gateway's stage channels, stop sending calls
        here; Kubernetes takes the pod out of its Service), while the server goes on serving the calls in flight
        and any that still arrive; once none has run for LINGER seconds, or `grace` seconds passed, stop.

        No GOAWAY before that: gRPC closes a shutting-down connection as soon as its last call ends on the
        server, and the kernel then drops the response bytes the client has not read yet (a video cut short)."""
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        idle_since = loop.time()
        while loop.time() < end:
            if self.in_flight.count > 0 or self.in_flight.draining > 0:  # refused uploads get their status too
                idle_since = loop.time()
            elif loop.time() - idle_since >= LINGER:
                break
            await asyncio.sleep(0.05)
        await self.server.stop(0)


def _listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc says only "Failed to bind to address"
        raise ConfigError(f"cannot listen on {address}: the port is in use, or the host is not an address of "
                          "this machine") from None


async def check_address(address: str) -> None:
    """Listen on `address` and let it go again: a port in use or a wrong host is a ConfigError before a stage
    loads its weights (minutes), not after."""
    probe = grpc.aio.server(options=[NO_PORT_SHARING])
    _listen(probe, address)
    await probe.start()  # a server that never started keeps its port bound after stop()
    await probe.stop(None)


def create_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to one of our servers (the gateway's to its stages, clients' to the gateway) with the
    servers' message limits, pinging while calls are in flight: a server whose host froze or whose network was
    cut fails the call UNAVAILABLE within CALL_PING_MS + CALL_PING_TIMEOUT_MS, however long the server may
    legitimately send nothing (a long denoising step), instead of holding a call without a deadline for good."""
    opts = [*message_size_options(max_message_bytes), ("grpc.keepalive_time_ms", CALL_PING_MS),
            *ping_timeout_options(CALL_PING_TIMEOUT_MS), ("grpc.http2.max_pings_without_data", 0), *options]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)
