"""A StageServer on a free loopback port with generic handlers, for the tests of the gRPC plumbing."""

import grpc

from smartdiff.shared.grpc_server import StageServer


async def serving(service: str, handlers: dict, **options) -> tuple[StageServer, int]:
    """A started, SERVING StageServer with `handlers` ({method: grpc.*_rpc_method_handler(...)}) under `service`
    ("test.Slow" -> /test.Slow/<method>); `options` go to StageServer. Returns (server, port)."""
    server = StageServer(["smartdiff.gateway.v1.GatewayService"], **options)
    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_port("127.0.0.1:0")
    await server.start()
    await server.mark_serving()
    return server, port
