"""The whole deployment in one process: the four services on loopback ports, talking real gRPC."""

from __future__ import annotations

from smartdiff.services.denoiser import server as denoiser_server
from smartdiff.services.gateway import server as gateway_server
from smartdiff.services.text_encoder import server as text_encoder_server
from smartdiff.services.vae import server as vae_server
from smartdiff.shared.checkpoint import CheckpointLayout
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.serving import SystemConfig


class EmbeddedDeployment:
    """`await EmbeddedDeployment.start(...)` -> `.address` is the gateway; `await d.stop()` ends all four. The three
    stages listen on `host` (loopback by default: only the gateway calls them), the gateway on `gateway_host`
    (default: `host`)."""

    def __init__(self):
        self.servers = []
        self.stages: gateway_server.StageClients | None = None
        self.address = ""

    @classmethod
    async def start(cls, model: ModelConfig, layout: CheckpointLayout | None, system: SystemConfig,
                    host: str = "127.0.0.1", gateway_port: int = 0, gateway_host: str | None = None,
                    denoiser: denoiser_server.DenoiserOptions = denoiser_server.DenoiserOptions(),
                    ) -> "EmbeddedDeployment":
        d = cls()
        try:
            addrs = {}
            for name, module in (("text_encoder", text_encoder_server), ("denoiser", denoiser_server),
                                 ("vae", vae_server)):
                extra = {"options": denoiser} if name == "denoiser" else {}
                server, port = await module.start(model, layout, system, f"{host}:0", **extra)
                d.servers.append(server)
                addrs[name] = f"{host}:{port}"
            d.stages = gateway_server.StageClients(addrs["text_encoder"], addrs["denoiser"], addrs["vae"])
            gateway_host = gateway_host or host
            server, port = await gateway_server.start(model, d.stages, f"{gateway_host}:{gateway_port}",
                                                      system.max_queue)
            d.servers.append(server)
            d.address = f"{gateway_host}:{port}"
        except BaseException:
            await d.stop()
            raise
        return d

    async def stop(self, grace: float = 1.0) -> None:
        for server in reversed(self.servers):
            await server.stop(grace)
        self.servers = []
        if self.stages is not None:
            await self.stages.close()
            self.stages = None
