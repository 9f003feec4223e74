"""Shared fixtures: tiny random checkpoints in the Diffusers and official Wan layouts (built once per session)."""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before anything imports grpc (see smartdiff.shared)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, which triton.jit reads when a kernel module is
    # imported: set it before any test module imports one (otherwise `pytest tests/gateway tests/vae` built the
    # VAE's kernel for a GPU first, and only the whole suite's collection order hid it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tiny_checkpoints  # noqa: E402

_TEST_PROCESS, _hard_exit = os.getpid(), os._exit


_hard_exits: list[int] = []


def _no_hard_exit_here(code: int) -> None:
    """os._exit in the pytest process itself would end the run with that code and no report (0: a silent pass):
    code that exits the process hard is tested in subprocesses. Forked children exit as they would. A call on
    another thread (a timer) only raises there: the fixture below fails the test."""
    if os.getpid() == _TEST_PROCESS:
        _hard_exits.append(code)
        raise AssertionError(f"os._exit({code}) called in the pytest process")
    _hard_exit(code)


os._exit = _no_hard_exit_here


@pytest.fixture(autouse=True)
def _fail_on_a_hard_exit():
    yield
    calls, _hard_exits[:] = list(_hard_exits), []
    assert not calls, f"os._exit{tuple(calls)} called in the pytest process"


@pytest.fixture(scope="session")
def diffusers_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    return tiny_checkpoints.write_diffusers_folder(tmp_path_factory.mktemp("wan-diffusers"), num_experts=1)


@pytest.fixture(scope="session")
def diffusers_moe_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    return tiny_checkpoints.write_diffusers_folder(tmp_path_factory.mktemp("wan22-diffusers"), num_experts=2, seed=7)


@pytest.fixture(scope="session")
def wan_dir(diffusers_dir, tmp_path_factory):
    return tiny_checkpoints.write_wan_folder(diffusers_dir, tmp_path_factory.mktemp("wan-official"))


@pytest.fixture(scope="session")
def wan_moe_dir(diffusers_moe_dir, tmp_path_factory):
    return tiny_checkpoints.write_wan_folder(diffusers_moe_dir, tmp_path_factory.mktemp("wan22-official"))
