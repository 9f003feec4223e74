"""A 2-process (torchrun, gloo) cfg-parallel denoiser behind the real gateway: same latents as one process."""

import asyncio
import os
import signal
import subprocess
import sys

import torch

from smartdiff.gateway.v1 import gateway_pb2_grpc
from smartdiff.services.gateway import server as gateway_server
from smartdiff.services.gateway.client import generate, request_to_proto
from smartdiff.services.gateway.local import LocalPipeline
from smartdiff.services.text_encoder import server as te_server
from smartdiff.services.vae import server as vae_server
from smartdiff.shared.config import load_model_config
from smartdiff.shared.grpc_server import create_channel
from smartdiff.shared.request import GenerationRequest, resolve_request
from smartdiff.shared.serving import SystemConfig
from distributed_helpers import free_port

REQ = GenerationRequest(prompt="a lighthouse at night", negative_prompt="blur", width=48, height=48, frames=9,
                        steps=4, seed=11)


def start_torchrun(*flags: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "smartdiff.services.denoiser", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
           "--log-level", "WARNING", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.rstrip().endswith("SERVING"):
            return proc, line.split()[-2]
    proc.wait(10)
    raise AssertionError("torchrun denoiser exited before SERVING:\n" + "".join(lines[-30:]))


def test_cfg_parallel_denoiser_through_the_gateway():
    model = load_model_config("wan-tiny")
    proc, denoiser_addr = start_torchrun("--cfg-degree", "2")
    try:
        async def body():
            system = SystemConfig(torch.device("cpu"), torch.float32)
            te, te_port = await te_server.start(model, None, system, "127.0.0.1:0")
            vae, vae_port = await vae_server.start(model, None, system, "127.0.0.1:0")
            stages = gateway_server.StageClients(f"127.0.0.1:{te_port}", denoiser_addr, f"127.0.0.1:{vae_port}")
            gw, gw_port = await gateway_server.start(model, stages, "127.0.0.1:0")
            try:
                async with create_channel(f"127.0.0.1:{gw_port}") as ch:
                    return await generate(gateway_pb2_grpc.GatewayServiceStub(ch), request_to_proto(REQ, return_latents=True))
            finally:
                for s in (gw, vae, te):
                    await s.stop(0)
                await stages.close()

        outcome = asyncio.run(body())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # as Kubernetes stops a pod: every process gets SIGTERM
        output = proc.communicate(timeout=60)[0]
        assert "/services/" not in output, output  # no traceback from our ranks (torchrun reports the signal)
    local = LocalPipeline.load(model, None, torch.device("cpu"), torch.float32).generate(resolve_request(REQ, model))
    assert ((outcome.latents - local.latents).norm() / local.latents.norm()) <= 1e-5
    assert outcome.summary.settings.seed == 11


def test_invalid_layout_is_refused_at_start_with_a_suggestion():
    proc = subprocess.run(
        [sys.executable, "-m", "smartdiff.services.denoiser", "--port", "0", "--device", "cpu", "--ulysses-degree", "2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "world size 1 must equal cfg x ulysses x ring" in proc.stdout and "suggested" in proc.stdout


def test_rank_zero_shutdown_waits_for_the_job_on_the_channel(monkeypatch):
    """SIGTERM can stop rank 0's server while a cancelled job still runs its last step on the worker thread:
    the shutdown message must not cross that job's collectives on the channel (gloo aborts, NCCL hangs)."""
    import threading
    import time
    from types import SimpleNamespace

    from smartdiff.services.denoiser import distributed

    events = []

    def slow_job(engine, job, prompt, negative, progress=None, cancelled=None):
        events.append("job start")
        time.sleep(0.3)
        events.append("job end")

    class Channel:
        device = "cpu"

        def send(self, params, prompt, negative):
            return prompt, negative

        def send_shutdown(self):
            events.append("shutdown")

    monkeypatch.setattr(distributed, "run_job", slow_job)
    monkeypatch.setattr(distributed, "LockstepStop", lambda device, cancelled: cancelled)
    runner = distributed.RankZeroRunner(engine=None, channel=Channel())
    job = SimpleNamespace(params=None, request=SimpleNamespace(uses_cfg=False))
    worker = threading.Thread(target=runner, args=(job, None, None))
    worker.start()
    while not events:
        time.sleep(0.01)
    runner.shutdown()
    worker.join()
    assert events == ["job start", "job end", "shutdown"]
