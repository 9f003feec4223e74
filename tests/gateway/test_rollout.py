"""A rolling update of a stage with one replica, as the Kubernetes manifests do it (maxSurge 1, maxUnavailable 0,
a headless Service): the new replica is ready, then the old one leaves the Service and drains with a call still
in flight. New generations must reach the new replica at once, not wait for the old one's drain."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

from smartdiff.gateway.v1 import gateway_pb2_grpc
from smartdiff.services.gateway import server as gateway_server
from smartdiff.services.gateway.client import generate, request_to_proto
from smartdiff.services.gateway.embedded import EmbeddedDeployment
from smartdiff.services.vae import server as vae_server
from smartdiff.shared.config import load_model_config
from smartdiff.shared.grpc_server import create_channel
from smartdiff.shared.request import GenerationRequest
from smartdiff.shared.serving import SystemConfig
from smartdiff.vae.v1 import vae_pb2, vae_pb2_grpc
from fake_dns import FakeDNS

CPU = SystemConfig(torch.device("cpu"), torch.float32, max_queue=2)
SMALL = dict(width=32, height=32, frames=5, steps=3)


@pytest.mark.skipif(os.environ.get("GRPC_DNS_RESOLVER", "ares") != "ares", reason="needs gRPC's c-ares resolver")
def test_a_replaced_replica_is_found_while_the_old_one_drains():
    async def main():
        dns = FakeDNS()
        model = load_model_config("wan-tiny")
        d = await EmbeddedDeployment.start(model, None, CPU)
        old, port = await vae_server.start(model, None, CPU, "127.0.0.1:0")
        dns.records["vae.test"] = ["127.0.0.1"]
        a = d.stages.addresses
        stages = gateway_server.StageClients(a["text_encoder"], a["denoiser"],
                                             f"dns://127.0.0.1:{dns.port}/vae.test:{port}")
        gw, gw_port = await gateway_server.start(model, stages, "127.0.0.1:0", 4)
        new = vae_channel = None
        try:
            async with create_channel(f"127.0.0.1:{gw_port}") as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)

                async def one(seed):
                    return await generate(stub, request_to_proto(GenerationRequest(prompt="x", seed=seed, **SMALL)),
                                          timeout=30)

                await one(0)  # on the old replica
                new, _ = await vae_server.start(model, None, CPU, f"127.0.0.2:{port}")  # the surge pod, ready
                dns.records["vae.test"] = ["127.0.0.1", "127.0.0.2"]
                vae_channel = create_channel(f"127.0.0.1:{port}")  # a video still decoding on the old replica
                in_flight = vae_pb2_grpc.VaeServiceStub(vae_channel).Decode()
                await in_flight.write(vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams(request_id="long",
                                                                                        model="wan-tiny")))
                while old.in_flight.count == 0:
                    await asyncio.sleep(0.01)
                dns.records["vae.test"] = ["127.0.0.2"]  # preStop: out of the Service; then SIGTERM
                drain = asyncio.create_task(old.drain(60))
                seconds = []
                for seed in range(1, 4):
                    start = time.monotonic()
                    await one(seed)
                    seconds.append(time.monotonic() - start)
                    await asyncio.sleep(0.5)
                assert not drain.done()  # all of that while the old replica still drained its call
                in_flight.cancel()
                await asyncio.wait_for(drain, 10)
                return seconds
        finally:
            if vae_channel is not None:
                await vae_channel.close()
            await gw.stop(0)
            await stages.close()
            for server in (new, old):
                if server is not None:
                    await server.stop(0)
            await d.stop()
            dns.close()

    seconds = asyncio.run(main())
    assert max(seconds) < 5, seconds  # found within the resolver's 1 s floor, not its default 30 s
