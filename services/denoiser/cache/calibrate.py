"""Fit FlexCache numbers from full (uncached) runs: TeaCache polynomials per expert and MagCache ratios.

For every step after an expert's first, per CFG branch, a recording block-stack hook measures
- x: the relative L1 change of the timestep embedding e (and of its projection e6) since the previous step,
- y: the relative L1 change of the model output (the head applied to the block stack's output),
- the mean over tokens of ||r_i|| / ||r_(i-1)|| for the block-stack residual r (MagCache's magnitude ratio).
TeaCache's polynomial is the least-squares fit y ~ poly(x) (degree 4, as published) over all runs, branches and
steps of each expert; MagCache's ratios are averaged over runs per step and branch (1.0 at an expert's first step).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..dit import ForwardHooks
from .published import CacheCalibration
from .session import CacheStats, StepInfo, StrategyContext

DEGREE = 4


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b|."""
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


@dataclass
class Sample:
    step: int
    x_e: float
    x_e6: float
    y: float
    ratio: float


@dataclass
class _Previous:
    e: torch.Tensor
    e6: torch.Tensor
    out: torch.Tensor
    residual: torch.Tensor


@dataclass
class Recording:
    """Samples of every run, keyed by (expert, branch)."""

    samples: dict[tuple[int, int], list[Sample]] = field(default_factory=lambda: defaultdict(list))


class _Recorder:
    """The running strategy of one calibration run: computes every block and records the measurements."""

    def __init__(self, ctx: StrategyContext, stats: CacheStats, recording: Recording):
        self.ctx, self.stats, self.recording = ctx, stats, recording
        self.previous: dict[tuple[int, int], _Previous] = {}

    def hooks(self, step: StepInfo, branches: tuple[int, ...]) -> ForwardHooks:
        return ForwardHooks(blocks=partial(self._blocks, step, branches))

    def close(self) -> None:
        self.previous.clear()

    def _blocks(self, step, branches, run, tokens, e, e6, ctx):
        out = run(tokens, e6, ctx)
        self.stats.count("block_stack", len(branches), 0)
        head = self.ctx.experts[step.expert].head(out, e)  # [B, L, out * patch] model output (before unpatchify)
        residual = out - tokens
        for r, b in enumerate(branches):
            now = _Previous(e[r].clone(), e6[r].clone(), head[r].clone(), residual[r].clone())
            prev = self.previous.get((step.expert, b))
            if prev is not None:
                ratio = (now.residual.float().norm(dim=-1) / prev.residual.float().norm(dim=-1)).mean().item()
                self.recording.samples[(step.expert, b)].append(Sample(
                    step.index, rel_l1(now.e, prev.e), rel_l1(now.e6, prev.e6), rel_l1(now.out, prev.out), ratio))
            self.previous[(step.expert, b)] = now
        return out


class CalibrationRecorder:
    """A custom strategy for `DenoiserEngine.denoise(cache=...)` that records; pass the same one to every run."""

    name = "calibrate"

    def __init__(self):
        self.recording = Recording()

    def start(self, ctx: StrategyContext, stats: CacheStats) -> _Recorder:
        return _Recorder(ctx, stats, self.recording)


def fit(recording: Recording, model_name: str, num_experts: int, steps: int, degree: int = DEGREE,
        notes: dict | None = None) -> CacheCalibration:
    """Polynomials per expert (both modes) and per-step ratios per branch from the recorded samples."""
    teacache = []
    for k in range(num_experts):
        samples = [s for (e, _), ss in recording.samples.items() if e == k for s in ss]
        if len(samples) <= degree:
            raise ValueError(f"expert {k}: {len(samples)} samples, need more than {degree}: run more steps or prompts")
        y = np.array([s.y for s in samples])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            polys = tuple(tuple(float(c) for c in np.polyfit(np.array([getattr(s, x) for s in samples]), y, degree))
                          for x in ("x_e", "x_e6"))
        if caught:  # few or clustered samples (e.g. Wan2.2's short high-noise segment): say so in the file
            notes = {**(notes or {}), f"expert_{k}_warning": "polynomial fit poorly conditioned; add prompts or steps"}
        teacache.append(polys)
    ratios = []
    for b in (0, 1):
        per_step = defaultdict(list)
        for (_, branch), ss in recording.samples.items():
            if branch == b:
                for s in ss:
                    per_step[s.step].append(s.ratio)
        ratios.append(tuple(float(np.mean(per_step[i])) if per_step[i] else 1.0 for i in range(steps)))
    if not any(branch == 1 for (_, branch) in recording.samples):
        ratios[1] = ratios[0]  # calibrated without CFG: use the cond ratios for both
    return CacheCalibration(model_name, steps, tuple(teacache), (ratios[0], ratios[1]), dict(notes or {}))


def calibrate(engine, runs: Sequence[tuple], degree: int = DEGREE) -> CacheCalibration:
    """Run `engine.denoise` uncached on every (request, context, negative) and fit the numbers.

    Every request must have the same number of steps (the ratio table is per step).
    """
    steps = {req.steps for req, _, _ in runs}
    if len(steps) != 1:
        raise ValueError(f"calibration runs need one step count, got {sorted(steps)}")
    recorder = CalibrationRecorder()
    for req, context, negative in runs:
        engine.denoise(req, context, negative, cache=recorder)
    req = runs[0][0]
    notes = {"runs": len(runs), "sampler": req.sampler, "shift": req.shift, "guidance": list(req.guidance),
             "size": f"{req.width}x{req.height}x{req.frames}", "dtype": str(engine.dtype).removeprefix("torch.")}
    return fit(recorder.recording, engine.model.name, engine.model.num_experts, steps.pop(), degree, notes)
