"""Build grpc.aio servers and channels alike for every stage: message limits, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Tensors travel in ~1 MiB chunks, so no message comes near this; it bounds what a peer can make us buffer.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


def message_size_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Explicit send/receive limits, used by servers and channels alike."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# Always answered, also while draining, and not counted as work in flight (a health Watch stays open for good).
_CONTROL_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Admission(grpc.aio.ServerInterceptor):
    """Counts a server's calls in flight (what a drain waits for) and, once draining, refuses new ones with
    UNAVAILABLE, which clients retry elsewhere; health and reflection calls always pass."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_CONTROL_PREFIXES):
            return handler
        service = details.method.strip("/").split("/")[0]
        if handler.response_streaming:
            kind = "stream_stream" if handler.request_streaming else "unary_stream"
            return handler._replace(**{kind: self._streaming(getattr(handler, kind), service,
                                                              handler.request_streaming)})
        kind = "stream_unary" if handler.request_streaming else "unary_unary"
        return handler._replace(**{kind: self._unary(getattr(handler, kind), service, handler.request_streaming)})

    async def _admit(self, request, context, service: str, request_streaming: bool) -> None:
        if self.draining:
            if request_streaming:  # read what the client sends: aborting mid-stream reaches it as INTERNAL
                async for _ in request:
                    pass
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{service} is shutting down and takes no new calls; retry (another replica, "
                                "or this one once restarted)")
        self.in_flight += 1

    def _unary(self, behavior, service: str, request_streaming: bool):
        async def call(request, context):
            await self._admit(request, context, service, request_streaming)
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1
        return call

    def _streaming(self, behavior, service: str, request_streaming: bool):
        async def call(request, context):
            await self._admit(request, context, service, request_streaming)
            try:
                responses = behavior(request, context)
                if hasattr(responses, "__aiter__"):
                    async for msg in responses:
                        yield msg
                else:  # a coroutine that writes through context.write
                    await responses
            finally:
                self.in_flight -= 1
        return call


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
        max_concurrent_rpcs: int | None = None,
        options: Sequence[tuple[str, object]] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        # Past max_concurrent_rpcs, gRPC itself answers RESOURCE_EXHAUSTED.
        self.admission = Admission()
        self.server = grpc.aio.server(
            # Clients reconnect (and re-resolve DNS, picking up new replicas) every 5 minutes; calls in
            # flight on an old connection are never cut (no max_connection_age_grace).
            options=[*message_size_options(max_message_bytes), ("grpc.max_connection_age_ms", 300_000), *options],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            interceptors=[self.admission, *interceptors],
        )
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
            self.server,
        )

    def add_port(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on `address` ("[::]:0" picks a free port); returns the bound port."""
        if credentials is None:
            return self.server.add_insecure_port(address)
        return self.server.add_secure_port(address, credentials)

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

    async def mark_not_serving(self) -> None:
        """Take the server out of rotation (e.g. while reloading weights)."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING for good, then let in-flight RPCs finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def begin_drain(self) -> None:
        """NOT_SERVING for good, and new calls refused (UNAVAILABLE); the calls in flight go on."""
        self.admission.draining = True
        await self.health.enter_graceful_shutdown()

    async def drain(self, grace: float) -> None:
        """SIGTERM: NOT_SERVING for good and no new calls (UNAVAILABLE, which clients retry elsewhere), while
        still listening (health checks get the answer, not a refused connection), until the calls in flight
        are done or `grace` seconds passed; then stop, giving the calls still streaming their results what is
        left of `grace` (at least 1 s)."""
        await self.begin_drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self.admission.in_flight > 0 and loop.time() < end:
            await asyncio.sleep(0.05)
        await self.server.stop(max(end - loop.time(), 1.0))

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def create_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to a stage with the same message limits as the servers."""
    opts = [*message_size_options(max_message_bytes), *options]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)


def remaining_timeout(context: grpc.aio.ServicerContext, reserve: float = 0.0) -> float | None:
    """Seconds left of the incoming call's deadline minus `reserve`, to pass as `timeout=` to a stage call.

    None when the caller set no deadline. Cancellation propagates by itself: cancelling the handler's
    task cancels the stage call it is awaiting.
    """
    left = context.time_remaining()
    if left is None:
        return None
    return max(left - reserve, 0.0)
