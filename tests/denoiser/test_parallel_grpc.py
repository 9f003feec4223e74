"""A 2-process (gloo) cfg-parallel denoiser behind the real gateway: same latents as one process, under torchrun
and under our launcher (--nproc-per-node), which passes SIGTERM on and lets the ranks drain."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
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


DENOISER = ["-m", "smartdiff.services.denoiser", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]


def start_denoiser(cmd: list[str], lines: list[str] | None = None, env=None) -> tuple[subprocess.Popen, str]:
    """Start a multi-process denoiser (`env`: more variables); returns it and its address once rank 0 prints
    SERVING."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
                            start_new_session=True)
    lines = [] if lines is None else lines
    for line in proc.stdout:
        lines.append(line)
        if line.rstrip().endswith("SERVING"):
            return proc, line.split()[-2]
    proc.wait(10)
    raise AssertionError("the denoiser exited before SERVING:\n" + "".join(lines[-30:]))


def start_torchrun(*flags: str) -> tuple[subprocess.Popen, str]:
    return start_denoiser([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), *DENOISER, "--log-level", "WARNING", *flags])


def start_launcher(*flags: str, lines: list[str] | None = None, env=None) -> tuple[subprocess.Popen, str]:
    return start_denoiser([sys.executable, *DENOISER, "--nproc-per-node", "2", *flags], lines, env)


def through_a_gateway(denoiser_addr: str, during=None):
    """Generate REQ through a real gateway whose denoiser is `denoiser_addr`; `during()` runs once the denoiser
    reported its first step."""
    model = load_model_config("wan-tiny")

    async def body():
        system = SystemConfig(torch.device("cpu"), torch.float32)
        te, te_port = await te_server.start(model, None, system, "127.0.0.1:0")
        vae, vae_port = await vae_server.start(model, None, system, "127.0.0.1:0")
        stages = gateway_server.StageClients(f"127.0.0.1:{te_port}", denoiser_addr, f"127.0.0.1:{vae_port}")
        gw, gw_port = await gateway_server.start(model, stages, "127.0.0.1:0")
        fired = []

        def on_progress(stage, *_):
            if stage == "denoiser" and not fired and during is not None:
                fired.append(during())
        try:
            async with create_channel(f"127.0.0.1:{gw_port}") as ch:
                return await generate(gateway_pb2_grpc.GatewayServiceStub(ch), request_to_proto(REQ, return_latents=True),
                                      on_progress=on_progress)
        finally:
            for s in (gw, vae, te):
                await s.stop(0)
            await stages.close()

    return asyncio.run(body())


def same_as_one_process(outcome) -> bool:
    model = load_model_config("wan-tiny")
    local = LocalPipeline.load(model, None, torch.device("cpu"), torch.float32).generate(resolve_request(REQ, model))
    return bool(((outcome.latents - local.latents).norm() / local.latents.norm()) <= 1e-5)


def test_cfg_parallel_denoiser_through_the_gateway():
    proc, denoiser_addr = start_torchrun("--cfg-degree", "2")
    try:
        outcome = through_a_gateway(denoiser_addr)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # as Kubernetes stops a pod: every process gets SIGTERM
        output = proc.communicate(timeout=60)[0]
        assert "/services/" not in output, output  # no traceback from our ranks (torchrun reports the signal)
    assert same_as_one_process(outcome)
    assert outcome.summary.settings.seed == 11


def test_launcher_passes_sigterm_on_and_the_request_in_flight_completes():
    """Kubernetes sends SIGTERM to the container's first process only: the launcher passes it to the ranks, rank 0
    drains while the generation in flight finishes, every rank exits 0, and so does the launcher."""
    proc, denoiser_addr = start_launcher("--cfg-degree", "2", "--drain-seconds", "120")
    try:
        outcome = through_a_gateway(denoiser_addr, during=lambda: os.kill(proc.pid, signal.SIGTERM))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # an impatient second one changes nothing
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    assert "SIGTERM: passing it to the 2 ranks" in output and "draining" in output
    assert same_as_one_process(outcome) and outcome.summary.denoiser_world_size == 2


def test_launcher_stops_the_ranks_when_one_dies():
    """A rank that dies (OOM killer, a crash) leaves the others waiting on it in a collective: the launcher stops
    them and exits with the dead rank's code, so that the pod restarts."""
    lines: list[str] = []
    proc, _ = start_launcher("--cfg-degree", "2", "--log-level", "INFO", lines=lines)
    try:
        os.kill(rank_pids(lines)[1], signal.SIGKILL)
        output = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGKILL, output
    assert "rank 1 exited with code 137; stopping the other ranks" in output


def rank_pids(lines: list[str]) -> list[int]:
    return [int(ln.rsplit("pid ", 1)[1].rstrip(")\n")) for ln in lines if "/2 started (pid " in ln]


def test_ranks_die_with_their_launcher():
    """A launcher killed outright (SIGKILL, OOM killer) must not leave its ranks holding GPUs and the port."""
    lines: list[str] = []
    proc, _ = start_launcher("--cfg-degree", "2", "--log-level", "INFO", lines=lines)
    pids = rank_pids(lines)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert len(pids) == 2 and not alive


def test_launcher_exits_with_the_code_of_ranks_that_all_fail_at_once():
    """Every rank finds the same error while loading (no DiT offload on the CPU): exit 2, as one process does."""
    proc = subprocess.run([sys.executable, *DENOISER, "--nproc-per-node", "2", "--cfg-degree", "2",
                           "--low-mem-level", "3"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("error: ") == 2


def test_launcher_checks_the_layout_and_the_launch_before_starting_ranks():
    run = lambda *flags, env=None: subprocess.run(  # noqa: E731
        [sys.executable, *DENOISER, *flags], capture_output=True, text=True, timeout=120, env=env)
    bad_layout = run("--nproc-per-node", "2")
    assert bad_layout.returncode == 2 and "world size 2 must equal cfg x ulysses x ring" in bad_layout.stderr
    assert "started" not in bad_layout.stderr
    under_torchrun = run("--nproc-per-node", "2", "--cfg-degree", "2", env={**os.environ, "RANK": "0"})
    assert under_torchrun.returncode == 2 and "already a rank of another launcher" in under_torchrun.stderr
    nproc = run("--nproc-per-node", "0")
    assert nproc.returncode == 2 and "--nproc-per-node: must be between 1 and 64" in nproc.stderr


def test_invalid_layout_is_refused_at_start_with_a_suggestion():
    proc = subprocess.run(
        [sys.executable, "-m", "smartdiff.services.denoiser", "--port", "0", "--device", "cpu", "--ulysses-degree", "2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "world size 1 must equal cfg x ulysses x ring" in proc.stderr and "suggested" in proc.stderr


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
    runner = distributed.RankZeroRunner(engine=SimpleNamespace(parallel=None), channel=Channel())
    job = SimpleNamespace(params=None, request=SimpleNamespace(uses_cfg=False))
    worker = threading.Thread(target=runner, args=(job, None, None))
    worker.start()
    while not events:
        time.sleep(0.01)
    runner.shutdown()
    worker.join()
    assert events == ["job start", "job end", "shutdown"]


def test_cfg_parallel_reports_the_cache_counts_of_both_branches():
    """Each CFG-parallel rank runs one guidance branch; the summary counts what the cache computed and reused
    in both, as one process does (it counted rank 0's branch only: half)."""
    from smartdiff.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
    from smartdiff.services.denoiser import server as denoiser_server
    from smartdiff.shared.tensor_stream import tensor_to_messages

    model = load_model_config("wan-tiny")
    params = denoiser_pb2.DenoiseParams(width=48, height=48, frames=9, steps=10, guidance=[5.0], seed=3)
    params.cache.strategy = "budget"
    prompt, negative = torch.randn(5, model.dit.text_dim), torch.randn(3, model.dit.text_dim)

    def requests():
        yield denoiser_pb2.DenoiseRequest(params=params)
        yield from tensor_to_messages(prompt, denoiser_pb2.DenoiseRequest, "prompt_embeds")
        yield from tensor_to_messages(negative, denoiser_pb2.DenoiseRequest, "negative_prompt_embeds")

    async def summary(address):
        async with create_channel(address) as ch:
            return [m async for m in denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(requests())][-1].summary

    async def one_process():
        server, port = await denoiser_server.start(model, None, SystemConfig(torch.device("cpu"), torch.float32),
                                                   "127.0.0.1:0", denoiser_server.DenoiserOptions(enable_flexcache=True))
        try:
            return await summary(f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    proc, address = start_launcher("--cfg-degree", "2", "--enable-flexcache")
    try:
        pod = asyncio.run(summary(address))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    single = asyncio.run(one_process())
    assert single.cached_steps > 0 and pod.world_size == 2
    assert pod.cached_steps == single.cached_steps and pod.cache_report == single.cache_report


FAULTS = os.path.join(os.path.dirname(__file__), "faults")  # sitecustomize.py: faults injected into the ranks


def with_faults(**variables) -> dict:
    return {"PYTHONPATH": os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]), **variables}


def denoise_once(address: str, steps: int = 4, timeout: float = 60):
    """One CFG request straight to the denoiser: None when it succeeded, else the gRPC error."""
    import grpc

    from smartdiff.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
    from smartdiff.shared.tensor_stream import tensor_to_messages

    dim = load_model_config("wan-tiny").dit.text_dim
    params = denoiser_pb2.DenoiseParams(width=48, height=48, frames=9, steps=steps, guidance=[5.0], seed=3)

    def requests():
        yield denoiser_pb2.DenoiseRequest(params=params)
        yield from tensor_to_messages(torch.randn(5, dim), denoiser_pb2.DenoiseRequest, "prompt_embeds")
        yield from tensor_to_messages(torch.randn(3, dim), denoiser_pb2.DenoiseRequest, "negative_prompt_embeds")

    async def call():
        async with create_channel(address) as ch:
            try:
                [m async for m in denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(requests(), timeout=timeout)]
            except grpc.aio.AioRpcError as e:
                return e

    return asyncio.run(call())


def ended(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_job_that_fails_on_one_rank_only_restarts_the_pod_instead_of_hanging():
    """Rank 1 raises where rank 0 does not (out of memory on one GPU, say), at the second step of the first
    request: rank 0 waits for it in a collective. The client gets an error and the pod exits (code 1), so that
    Kubernetes restarts it; before, the pod hung and its health stayed SERVING."""
    import grpc

    for faulty, kind in ((1, "raise"), (0, "raise"), (0, "oom")):
        proc, address = start_launcher("--cfg-degree", "2", "--log-level", "WARNING",
                                       env=with_faults(SMARTDIFF_TEST_FAULT=f"{faulty}:3:{kind}"))
        start = time.monotonic()
        error = denoise_once(address)
        output = ended(proc)
        assert error is not None and time.monotonic() - start < 60, output
        assert proc.returncode == 1, output
        assert f"rank {faulty}: a job failed here" in output, output
        if kind == "oom":  # the request's size, most likely: not "retry" as it is
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "smaller size" in error.details()


def test_an_idle_pod_outlives_the_job_timeout():
    """The wait for the next job is not a collective with the jobs' timeout (an idle pod used to die after it,
    30 min on gloo, NCCL's 10 min watchdog on GPUs)."""
    proc, address = start_launcher("--cfg-degree", "2", "--log-level", "WARNING",
                                   env=with_faults(SMARTDIFF_TEST_JOB_TIMEOUT="6"))
    try:
        time.sleep(9)
        assert denoise_once(address) is None
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = ended(proc)
    assert proc.returncode == 0, output


def test_a_rank_that_exits_while_rank_0_serves_stops_the_pod():
    """Only rank 0 tells the others to stop: one that ends by itself, even with code 0, leaves the pod unable to
    run a job, so the launcher stops it (exit 1)."""
    done = subprocess.run([sys.executable, *DENOISER, "--nproc-per-node", "2", "--cfg-degree", "2", "--log-level",
                           "WARNING"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **with_faults(SMARTDIFF_TEST_FAULT="1:2:exit0")})
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "rank 1 exited while rank 0 serves" in done.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_on_two_gpus_a_pod_serves_then_restarts_on_a_one_rank_failure():
    """NCCL for the jobs, gloo for the job headers: a request, an idle wait past the job timeout, a request; then
    a pod whose rank 1 fails at its second request's second step exits instead of hanging in NCCL."""
    gpu = [a if a != "cpu" else "cuda" for a in DENOISER]
    proc, address = start_denoiser([sys.executable, *gpu, "--nproc-per-node", "2", "--cfg-degree", "2",
                                    "--compile", "off", "--log-level", "WARNING"],
                                   env=with_faults(SMARTDIFF_TEST_JOB_TIMEOUT="6"))
    try:
        assert denoise_once(address) is None
        time.sleep(9)
        assert denoise_once(address) is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = ended(proc)
    assert proc.returncode == 0, output
    proc, address = start_denoiser([sys.executable, *gpu, "--nproc-per-node", "2", "--cfg-degree", "2",
                                    "--compile", "off", "--log-level", "WARNING"],
                                   env=with_faults(SMARTDIFF_TEST_FAULT="1:7:raise"))
    assert denoise_once(address) is None  # warm-up: call 1; this request: calls 2-5
    start = time.monotonic()
    error = denoise_once(address)
    output = ended(proc, timeout=90)
    assert error is not None and proc.returncode == 1, output
    assert time.monotonic() - start < 90 and "rank 1: a job failed here" in output, output
