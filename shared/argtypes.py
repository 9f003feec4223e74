"""argparse types shared by the command lines: argparse names the flag and prints the rule on a bad value."""

from __future__ import annotations

import argparse
from pathlib import Path


def ranged_int(lo: int, hi: int):
    """An integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value
    return parse


def seconds(least: float = 0.0):
    """A finite number of seconds, at least `least` (NaN and infinity refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
        if not least <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be finite and >= {least:g}, got {text}")
        return value
    return parse


def check_out_path(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work that produces it (a generation, a
    calibration: minutes to hours), with ConfigError naming the flag. Its folder is created here (as the file
    will be), and the file is tried: opened for appending (an existing one is left as it is), removed again if
    this made it."""
    from smartdiff.shared.config import ConfigError

    if path.is_dir():
        raise ConfigError(f"{flag}: {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot create the folder {path.parent}: {e.strerror or e}") from None
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
    if not existed:
        path.unlink()
