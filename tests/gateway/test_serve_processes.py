"""Long-lived services as separate processes: `smartdiff serve <stage>` x4 and `serve all`, driven by the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from smartdiff.services.denoiser.launch import free_port
from smartdiff.services.gateway.cli import main
from smartdiff.services.vae.video import probe_mp4

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """Start `smartdiff serve ...` on a fixed free port, as the manifests do; wait for its '... SERVING' line;
    return (process, address). The lines it printed up to there are in `process.printed`."""
    proc = subprocess.Popen([sys.executable, "-m", "smartdiff.services.gateway.cli", "serve", *args, "--port",
                             str(free_port()), "--host", "127.0.0.1", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    proc.printed = []
    for line in proc.stdout:
        proc.printed.append(line.rstrip())
        if line.rstrip().endswith("SERVING"):
            return proc, line.split()[-2]
    proc.wait(5)
    raise AssertionError(f"{args[0]} exited with {proc.returncode} before SERVING")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_four_stage_processes_serve_a_generation(tmp_path):
    procs = []
    try:
        addrs = {}
        for stage in ("text-encoder", "denoiser", "vae"):
            proc, addrs[stage] = start(stage)
            procs.append(proc)
        proc, gw = start("gateway", "--text-encoder", addrs["text-encoder"], "--denoiser", addrs["denoiser"],
                         "--vae", addrs["vae"])
        procs.append(proc)
        out = tmp_path / "v.mp4"
        assert main(["generate", "--gateway", gw, "--prompt", "a boat", "--width", "32", "--height", "48",
                     "--frames", "5", "--steps", "2", "--seed", "4", "--out", str(out)]) == 0
        assert probe_mp4(out)[:3] == (5, 32, 48)
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0, 0]  # SIGTERM: drain, then a clean exit


def scrape(proc: subprocess.Popen) -> dict[str, float]:
    """The samples of the process's /metrics (started with --metrics-port 0: it printed the address)."""
    from prometheus_client.parser import text_string_to_metric_families

    address = next(line.split()[1] for line in proc.printed if line.startswith("metrics "))
    text = urllib.request.urlopen(f"http://{address}", timeout=10).read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_serve_all_prints_address_and_serving(tmp_path, capsys):
    proc, gw = start("all", "--metrics-port", "0")
    try:
        out = tmp_path / "v.mp4"
        small = ["--prompt", "x", "--width", "32", "--height", "32", "--frames", "1", "--steps", "1"]
        assert main(["generate", "--gateway", gw, *small, "--out", str(out)]) == 0
        assert probe_mp4(out)[0] == 1
        # through a gateway too, bad input is an error naming the field or flag (exit 2), never a traceback
        for flags, words in ((["--seed", "-1"], ["invalid request: seed: must be between 0"]),
                             (["--width", "-16"], ["width: must be between 16"]),
                             (["--model", "Wan2.1-T2V-14B"], ["model", "serves 'wan-tiny'"]),
                             (["--dtype", "float32", "--low-mem-level", "1", "--cfg-batch", "off"],
                              ["--dtype, --low-mem-level, --cfg-batch", "embedded"]),
                             (["--attention-param", "sparge=1"], ["sparge is a group of settings"]),
                             (["--out", str(tmp_path)], ["--out", "is a directory"])):
            capsys.readouterr()
            assert main(["generate", "--gateway", gw, *small, "--out", str(out), *flags]) == 2, flags
            err = capsys.readouterr().err
            assert "Traceback" not in err and all(w in err for w in words), err
        samples = scrape(proc)  # the generation and the refusal that reached the gateway, in its metrics
        generate = [("method", "Generate"), ("service", "GatewayService")]
        assert samples[f"smartdiff_calls_total{sorted([('code', 'OK'), *generate])}"] == 1
        assert samples[f"smartdiff_calls_total{sorted([('code', 'INVALID_ARGUMENT'), *generate])}"] >= 1
        assert samples["smartdiff_calls_total[('code', 'OK'), ('method', 'Denoise'), ('service', 'DenoiserService')]"] == 1
        for stage in ("text_encoder", "denoiser", "vae", "total"):
            assert samples[f"smartdiff_generation_stage_seconds_count[('stage', '{stage}')]"] == 1
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize("flags,words", [(["--port", "99999"], "--port: must be between 0 and 65535"),
                                         (["--max-queue", "0"], "--max-queue: must be between 1"),
                                         (["--device", "bogus"], "--device: 'bogus' is not a torch device"),
                                         (["--device", "mps"], "--device: mps: the services run on cpu or cuda"),
                                         (["--drain-seconds", "-5"], "--drain-seconds: must be finite and >= 0"),
                                         (["--drain-seconds", "nan"], "--drain-seconds: must be finite and >= 0")])
def test_serve_flags_are_checked_before_anything_loads(capsys, flags, words):
    with pytest.raises(SystemExit) as e:
        main(["serve", "vae", *flags])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_bad_model_flag_exits_with_a_message():
    proc = subprocess.run([sys.executable, "-m", "smartdiff.services.denoiser", "--model", "nope", "--port", "0"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


@pytest.mark.parametrize("stage", ["vae", "denoiser", "all"])
def test_a_port_in_use_is_refused_before_the_weights_load(stage, monkeypatch, capsys):
    """Another server on the port (gRPC would otherwise share it through SO_REUSEPORT) or a host that is not
    this machine's: a one-line error and exit 2, before any weights load."""
    from smartdiff.services.denoiser import server as denoiser_server
    from smartdiff.services.gateway.embedded import EmbeddedDeployment
    from smartdiff.services.vae.engine import VaeEngine

    def no_load(*a, **kw):
        raise AssertionError("the weights started loading")

    monkeypatch.setattr(VaeEngine, "random", no_load)
    monkeypatch.setattr(denoiser_server, "load_engine", no_load)
    monkeypatch.setattr(EmbeddedDeployment, "start", no_load)
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC's own listener: it would share the port
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        code = main(["serve", stage, "--host", "127.0.0.1", "--port", str(port)])
    finally:
        holder.close()
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in capsys.readouterr().err
    assert main(["serve", stage, "--host", "192.0.2.1", "--port", "50999"]) == 2  # TEST-NET-1: not this machine
    assert "cannot listen on 192.0.2.1:50999" in capsys.readouterr().err


def test_log_level_must_be_a_level(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "vae", "--log-level", "bogus"])
    assert e.value.code == 2 and "--log-level: invalid choice: 'BOGUS'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["text-encoder", "denoiser", "vae", "gateway"])
def test_each_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", stage, "--help"])
    assert e.value.code == 0 and "--port" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused(capsys):
    assert main(["generate", "--prompt", "x", "--device", "cuda"]) == 2
    assert "--device cuda: this machine has 0 CUDA device(s)" in capsys.readouterr().err


def test_serve_all_needs_every_parallel_degree_1(capsys):
    """(-1) x (-1) x 1 = 1 used to pass the check; each degree must be 1 in one process."""
    assert main(["serve", "all", "--cfg-degree", "-1", "--ulysses-degree", "-1"]) == 2
    assert "parallel degrees must be 1" in capsys.readouterr().err


def test_a_frozen_stage_fails_the_call_instead_of_holding_it(monkeypatch):
    """A stage whose process stops answering (host frozen, network cut: SIGSTOP here) fails the gateway's call to
    it with UNAVAILABLE once a ping goes unanswered, instead of holding a request without a deadline for good."""
    import asyncio

    import grpc
    import torch

    from smartdiff.services.gateway import server as gateway_server
    from smartdiff.shared import grpc_server
    from smartdiff.shared.tensor_stream import tensor_to_messages
    from smartdiff.vae.v1 import vae_pb2

    monkeypatch.setattr(grpc_server, "CALL_PING_MS", 1000)  # the gateway's pings, fast for the test
    monkeypatch.setattr(grpc_server, "CALL_PING_TIMEOUT_MS", 1000)
    proc, address = start("vae")

    async def main():
        stages = gateway_server.StageClients(address, address, address)
        try:
            await stages.reachable("vae", None)
            os.kill(proc.pid, signal.SIGSTOP)
            call = stages.vae.Decode(iter([vae_pb2.DecodeRequest(params=vae_pb2.DecodeParams()),
                                           *tensor_to_messages(torch.zeros(1, 16, 1, 2, 2), vae_pb2.DecodeRequest,
                                                               "latents")]))  # no deadline
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), 60)  # TimeoutError (a failure) if it is held
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            await stages.close()

    try:
        start_time = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - start_time < 30
    finally:
        assert stop(proc) == 0
