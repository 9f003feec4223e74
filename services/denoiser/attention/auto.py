"""`auto`: once per request, the fastest backend whose output stays within a tolerance of the exact one.

During the request's first DiT forward every self-attention layer runs the exact backend (whose output is
used) and each candidate on the same real q/k/v, recording the candidate's relative L2 error against the
exact output (the worst over layers) and its time. When a layer is called the second time (the next forward),
the choice is made: among the exact backends and the lossy ones whose worst error is within the tolerance,
the fastest. A lossy backend that failed the check is never chosen; with none passing, the exact one runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable

import torch

from .base import AttentionFn, Backend, BackendInfo, Kernel

INFO = BackendInfo(
    name="auto", description="fastest allowed backend whose output on the request's first step stays within a "
                             "relative-error tolerance of the exact one (exact otherwise)",
    lossy=False, devices=("cuda", "cpu"), dtypes=(torch.bfloat16, torch.float16, torch.float32),
)


@dataclass
class Trial:
    """One candidate's record over the measuring forward."""

    kernel: Kernel
    lossy: bool
    err: torch.Tensor | None = None  # worst relative error over layers (device scalar, read once at the end)
    events: list = field(default_factory=list)  # (start, end) CUDA events, or CPU seconds
    warm: bool = False

    def seconds(self) -> float:
        if not self.events:
            return float("inf")
        if isinstance(self.events[0], float):
            return sum(self.events) / len(self.events)
        return sum(s.elapsed_time(e) for s, e in self.events) / 1e3 / len(self.events)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||out - ref|| / ||ref|| in float32, as a device scalar."""
    ref32 = ref.float()
    return (out.float() - ref32).norm() / ref32.norm().clamp_min(1e-30)


class AutoKernel(Kernel):
    name = "auto"

    def __init__(self, exact: Kernel, candidates: list[tuple[Kernel, bool]], tolerance: float,
                 skipped: list[tuple[str, str]]):
        self.exact = Trial(exact, lossy=False)
        self.trials = [Trial(k, lossy) for k, lossy in candidates]
        self.tolerance = tolerance
        self.skipped = skipped  # (name, reason) of candidates that cannot run here
        self.seen: set[Hashable] = set()
        self.chosen: Kernel | None = None
        self.summary = ""

    def for_layer(self, key: Hashable) -> AttentionFn:
        return lambda q, k, v: self._call(key, q, k, v)

    def _call(self, key: Hashable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.chosen is None and key in self.seen:  # the first forward is over
            self.decide()
        if self.chosen is not None:
            return self.chosen(q, k, v)
        self.seen.add(key)
        ref = self._timed(self.exact, q, k, v)
        for trial in self.trials:
            err = relative_error(self._timed(trial, q, k, v), ref)
            trial.err = err if trial.err is None else torch.maximum(trial.err, err)
        return ref

    @staticmethod
    def _timed(trial: Trial, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not trial.warm:  # first call compiles / probes: not timed
            trial.kernel(q, k, v)
            trial.warm = True
        if q.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = trial.kernel(q, k, v)
            end.record()
            trial.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = trial.kernel(q, k, v)
        trial.events.append(time.perf_counter() - t0)
        return out

    def decide(self) -> Kernel:
        """Choose now from what was measured (the exact backend if nothing was)."""
        if self.chosen is not None:
            return self.chosen
        if self.exact.events and not isinstance(self.exact.events[0], float):
            torch.cuda.synchronize()  # the events and error scalars are read below
        t_exact = self.exact.seconds()
        passed, notes = [self.exact], []
        for trial in self.trials:
            err = float("inf") if trial.err is None else trial.err.item()
            ok = err <= self.tolerance or not trial.lossy
            if ok:
                passed.append(trial)
            notes.append(f"{trial.kernel.label}: rel err {err:.1e}{'' if ok else ' > tol'}, "
                         f"{1e3 * trial.seconds():.2f} ms")
        best = min(passed, key=lambda t: t.seconds())
        if not self.exact.events:
            detail = "no attention call measured"
        elif best is self.exact:
            detail = f"exact kernel fastest of those passing: {1e3 * t_exact:.2f} ms/call"
        else:
            err = ("exact, " if not best.lossy or best.err is None
                   else f"rel err {best.err.item():.1e} <= tol {self.tolerance:.1e}, ")
            detail = f"{err}{1e3 * best.seconds():.2f} ms/call vs {self.exact.kernel.label} {1e3 * t_exact:.2f} ms"
        others = notes + [f"{name}: unavailable ({why})" for name, why in self.skipped]
        self.summary = f"({detail}{'; ' if others else ''}{'; '.join(others)})"
        self.chosen = best.kernel
        self.name, self.label = best.kernel.name, best.kernel.label
        self.trials = []  # drop the losers (and their compiled state) now
        self.exact = Trial(self.exact.kernel, False)
        return self.chosen

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.decide()(q, k, v)

    def describe(self) -> str:
        chosen = self.decide()
        return f"auto->{chosen.describe()} {self.summary}"


def _check(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    return None  # always runs: with no candidate available it is the exact backend


def build(choice, device, dtype, head_dim):  # built by handle.attach, which knows the allowed candidates
    raise TypeError("auto is built by attention.attach(), not directly")


BACKEND = Backend(INFO, _check, build)
