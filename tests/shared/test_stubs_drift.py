"""The checked-in stubs are exactly what `python proto/generate.py` makes from proto/, deterministically."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "proto" / "generate.py"
CHECKED_IN = ROOT / "proto" / "gen" / "python"


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_match_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = load_generator()
    gen.generate(tmp_path)
    stale = gen.diff_trees(tmp_path / "smartdiff", CHECKED_IN / "smartdiff")
    assert not stale, f"stubs out of date, run `python proto/generate.py`: {stale}"


def test_generation_is_deterministic(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = load_generator()
    gen.generate(tmp_path / "a")
    gen.generate(tmp_path / "b")
    assert gen.diff_trees(tmp_path / "a" / "smartdiff", tmp_path / "b" / "smartdiff") == []


def test_check_command_reports_drift(tmp_path):
    pytest.importorskip("grpc_tools")
    out = tmp_path / "gen"
    assert (
        subprocess.run(
            [sys.executable, str(GENERATOR), "--out", str(out)], capture_output=True, check=False
        ).returncode
        == 0
    )
    ok = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    (out / "smartdiff" / "vae" / "v1" / "vae_pb2.py").write_text("# hand-edited\n")
    bad = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "vae_pb2.py" in bad.stderr


def test_namespace_root_has_no_init():
    # `smartdiff` must stay an implicit namespace so services/, shared/ and the stubs all live under it.
    assert not (CHECKED_IN / "smartdiff" / "__init__.py").exists()
    import smartdiff.gateway.v1.gateway_pb2_grpc as grpc_stubs
    import smartdiff.shared.errors  # noqa: F401

    assert grpc_stubs.GatewayServiceStub
