"""argparse types shared by the command lines: argparse names the flag and prints the rule on a bad value."""

from __future__ import annotations

import argparse


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
