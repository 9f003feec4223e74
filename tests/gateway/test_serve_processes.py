"""Long-lived services as separate processes: `smartdiff serve <stage>` x4 and `serve all`, driven by the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from smartdiff.services.gateway.cli import main
from smartdiff.services.vae.video import probe_mp4

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """Start `smartdiff serve ...` on a free port; wait for its '... SERVING' line; return (process, address)."""
    proc = subprocess.Popen([sys.executable, "-m", "smartdiff.services.gateway.cli", "serve", *args, "--port", "0",
                             "--host", "127.0.0.1", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in proc.stdout:
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


def test_serve_all_prints_address_and_serving(tmp_path):
    proc, gw = start("all")
    try:
        out = tmp_path / "v.mp4"
        assert main(["generate", "--gateway", gw, "--prompt", "x", "--width", "32", "--height", "32",
                     "--frames", "1", "--steps", "1", "--out", str(out)]) == 0
        assert probe_mp4(out)[0] == 1
    finally:
        assert stop(proc) == 0


def test_bad_model_flag_exits_with_a_message():
    proc = subprocess.run([sys.executable, "-m", "smartdiff.services.denoiser", "--model", "nope", "--port", "0"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stdout


@pytest.mark.parametrize("stage", ["text-encoder", "denoiser", "vae", "gateway"])
def test_each_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", stage, "--help"])
    assert e.value.code == 0 and "--port" in capsys.readouterr().out
