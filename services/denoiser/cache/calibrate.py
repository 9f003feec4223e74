"""Fit FlexCache numbers from full (uncached) runs: TeaCache polynomials per expert and MagCache ratios.

For every step after an expert's first, per CFG branch, a recording block-stack hook measures
- x: the relative L1 change of the timestep embedding e (and of its projection e6) since the previous step,
- y: the relative L1 change of the model output (the head applied to the block stack's output),
- the mean over tokens of ||r_i|| / ||r_(i-1)|| for the block-stack residual r (MagCache's magnitude ratio),
- for d = 1 .. REUSE_DISTANCES, the RMS error of the model output if step i reused r_(i-d) of the same expert:
  the head applied to tokens_i + r_(i-d) against the real output (the budget cache's reuse-error table).
TeaCache's polynomial is the least-squares fit y ~ poly(x) (degree 4, as published) over all runs, branches and
steps of each expert; MagCache's ratios and the reuse errors are averaged over runs per step and branch (ratio
1.0 at an expert's first step, error inf where step i - d belongs to another expert or precedes the run).
The recorder keeps REUSE_DISTANCES residuals per branch of the running expert only (for Wan 14B at 720p, 0.8 GB
each in bf16: 7.7 GB with CFG) and evaluates the head on one stale residual at a time.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..dit import ForwardHooks
from ..samplers import make_sampler
from .published import CacheCalibration
from .session import CacheStats, StepInfo, StrategyContext

DEGREE = 4
REUSE_DISTANCES = 5  # reuse errors measured up to this many steps back (the budget cache's max_skip_steps <= this)


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
    reuse: tuple[float, ...] = ()  # output RMS error when reusing the residual 1, 2, ... steps back


@dataclass
class _Previous:
    e: torch.Tensor
    e6: torch.Tensor
    out: torch.Tensor


@dataclass
class Recording:
    """Samples of every run, keyed by (expert, branch)."""

    samples: dict[tuple[int, int], list[Sample]] = field(default_factory=lambda: defaultdict(list))


class _Recorder:
    """The running strategy of one calibration run: computes every block and records the measurements."""

    def __init__(self, ctx: StrategyContext, stats: CacheStats, recording: Recording):
        self.ctx, self.stats, self.recording = ctx, stats, recording
        self.previous: dict[tuple[int, int], _Previous] = {}
        self.history: dict[tuple[int, int], list[torch.Tensor]] = {}  # residuals, newest first

    def hooks(self, step: StepInfo, branches: tuple[int, ...]) -> ForwardHooks:
        return ForwardHooks(blocks=partial(self._blocks, step, branches))

    def close(self) -> None:
        self.previous.clear()
        self.history.clear()

    def _blocks(self, step, branches, run, tokens, e, e6, ctx):
        out = run(tokens, e6, ctx)
        self.stats.count("block_stack", len(branches), 0)
        if any(k[0] != step.expert for k in self.history):  # a new expert: the last one's steps are over
            self.previous = {k: v for k, v in self.previous.items() if k[0] == step.expert}
            self.history = {k: v for k, v in self.history.items() if k[0] == step.expert}
        head = self.ctx.experts[step.expert].head(out, e)  # [B, L, out * patch] model output (before unpatchify)
        residual = out - tokens
        for r, b in enumerate(branches):
            key = (step.expert, b)
            now = _Previous(e[r].clone(), e6[r].clone(), head[r].clone())
            res = residual[r].clone()
            prev = self.previous.get(key)
            if prev is not None:
                last = self.history[key][0]
                ratio = (res.float().norm(dim=-1) / last.float().norm(dim=-1)).mean().item()
                reuse = self._reuse_errors(step.expert, tokens[r], e[r], head[r], self.history[key])
                self.recording.samples[key].append(Sample(
                    step.index, rel_l1(now.e, prev.e), rel_l1(now.e6, prev.e6), rel_l1(now.out, prev.out), ratio,
                    reuse))
            self.previous[key] = now
            self.history[key] = [res] + self.history.get(key, [])[:REUSE_DISTANCES - 1]
        return out

    def _reuse_errors(self, expert: int, tokens: torch.Tensor, e: torch.Tensor, real: torch.Tensor,
                      history: list[torch.Tensor]) -> tuple[float, ...]:
        """RMS error of the head output of tokens + each older residual (newest first) against the real one."""
        head = self.ctx.experts[expert].head
        return tuple((head((tokens + old)[None], e[None]).float() - real.float()).pow(2).mean().sqrt().item()
                     for old in history)


class CalibrationRecorder:
    """A custom strategy for `DenoiserEngine.denoise(cache=...)` that records; pass the same one to every run."""

    name = "calibrate"

    def __init__(self):
        self.recording = Recording()

    def start(self, ctx: StrategyContext, stats: CacheStats) -> _Recorder:
        return _Recorder(ctx, stats, self.recording)


def fit(recording: Recording, model_name: str, num_experts: int, steps: int, degree: int = DEGREE,
        notes: dict | None = None, timesteps: tuple[float, ...] | None = None) -> CacheCalibration:
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
    cond, uncond = (reuse_table(recording, b, steps) for b in (0, 1))
    if not any(branch == 1 for (_, branch) in recording.samples):
        ratios[1] = ratios[0]  # calibrated without CFG: use the cond numbers for both
    # steps run without CFG (guidance <= 1, e.g. one Wan2.2 expert) have no uncond measurement: use the cond one
    uncond = tuple(u if any(map(math.isfinite, u)) else c for c, u in zip(cond, uncond))
    return CacheCalibration(model_name, steps, tuple(teacache), (ratios[0], ratios[1]), (cond, uncond), timesteps,
                            dict(notes or {}))


def reuse_table(recording: Recording, branch: int, steps: int) -> tuple[tuple[float, ...], ...]:
    """[step][d - 1]: mean over runs of the recorded reuse errors; inf where none was recorded (step i - d is
    before the expert's first step: another expert, or before the run)."""
    per = defaultdict(list)
    for (_, b), ss in recording.samples.items():
        if b == branch:
            for s in ss:
                for d, err in enumerate(s.reuse, 1):
                    per[(s.step, d)].append(err)
    return tuple(tuple(float(np.mean(per[(i, d)])) if per[(i, d)] else math.inf for d in range(1, REUSE_DISTANCES + 1))
                 for i in range(steps))


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
    schedules = {tuple(make_sampler(r.sampler, r.steps, r.shift, engine.model.num_train_timesteps).timesteps.tolist())
                 for r, _, _ in runs}
    timesteps = schedules.pop() if len(schedules) == 1 else None
    if timesteps is None:
        notes["timesteps"] = "runs with different schedules: the reuse errors apply to any schedule of this step count"
    return fit(recorder.recording, engine.model.name, engine.model.num_experts, steps.pop(), degree, notes, timesteps)
