"""Whether Triton's interpreter (TRITON_INTERPRET=1, how the CPU tests run our kernels) works with the installed
NumPy. Triton 3.6 and older convert a one-element array to an int for `range(scalar)` loops, which NumPy 2.4
refuses (triton-lang/triton#9171, fixed in later Triton): every kernel loop over a scalar argument then fails. A
GPU machine with torch 2.11 (Triton 3.6) and a new NumPy has that combination."""

import functools
import os
import subprocess
import sys

import pytest

_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(X, n):
    for i in range(0, n):
        tl.store(X + i, i)

x = torch.zeros(3, dtype=torch.int32)
count[(1,)](x, 3)
assert x.tolist() == [0, 1, 2], x
"""


@functools.cache
def interpreter_error() -> str | None:
    """None if a kernel loop over a scalar argument runs in the interpreter, else the probe's last error line."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]


def require_interpreter() -> None:
    """Skip the calling test (or module) where Triton's interpreter cannot run our kernels with this NumPy."""
    error = interpreter_error()
    if error is not None:
        pytest.skip(f"Triton's interpreter fails with this NumPy (triton-lang/triton#9171): {error}",
                    allow_module_level=True)
