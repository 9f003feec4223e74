"""proto/ passes `buf lint` (STANDARD + COMMENTS rules) and `buf format`; buf-bin is a dev dep."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def buf_binary() -> str:
    found = shutil.which("buf") or shutil.which("buf", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("buf not installed; `pip install -e .[dev]` installs buf-bin")
    return found


def test_buf_lint():
    result = subprocess.run(
        [buf_binary(), "lint", "proto"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean():
    result = subprocess.run(
        [buf_binary(), "format", "--diff", "--exit-code", "proto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
