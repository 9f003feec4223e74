"""Pyramid Attention Broadcast (after VideoSys' PAB): reuse attention outputs between steps inside a window.

Every (expert, branch, block, kind) has a counter, starting at 0 and advanced after every call, computed or
not, modulo the request's step count (VideoSys `if_broadcast_*`). A call broadcasts the module's last output
when timestep_end < t < timestep_start and counter % range != 0 (range per kind: self- and cross-attention);
otherwise it computes. What is cached is the attention module's output, before the block applies its gate,
so a broadcast step still gates with its own timestep. An output is kept only while a later call can reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from ..dit import ForwardHooks
from .config import PabParams
from .session import CacheStats, Schedule, StepInfo, StrategyContext

DESCRIPTION = ("PAB: broadcast attention outputs between steps; self_attention_skip_range 2, "
               "cross_attention_skip_range 6, window the middle 70% of the steps' timesteps")
SELF_RANGE, CROSS_RANGE = 2, 6  # VideoSys' spatial / cross ranges for Latte and Open-Sora-Plan
STABLE = (0.15, 0.85)  # PAB: attention changes most in the first and last 15% of the steps


def default_window(schedule: Schedule) -> tuple[float, float]:
    """(timestep_start, timestep_end) whose open interval holds exactly the middle 70% of the steps, never the
    first or the last step (with 2 steps, none; the rounding gave 3 steps a window over all of them)."""
    t, n = schedule.timesteps, schedule.num_steps
    i0, i1 = max(1, int(STABLE[0] * n + 0.5)), min(n - 1, int(STABLE[1] * n + 0.5))  # steps i0 .. i1-1 broadcast
    if i1 <= i0:
        return 0.0, 0.0  # too few steps: an empty window
    start = 1000.0 if i0 == 0 else (t[i0 - 1] + t[i0]) / 2
    end = 0.0 if i1 >= n else (t[i1 - 1] + t[i1]) / 2
    return round(start, 3), round(end, 3)


def resolve(params: PabParams | None, ctx: StrategyContext) -> PabParams:
    p = params or PabParams()
    start, end = default_window(ctx.schedule)
    if p.timestep_start is not None and p.timestep_end is None:  # one bound given: the default other one stops there
        end = min(end, float(p.timestep_start))
    if p.timestep_end is not None and p.timestep_start is None:
        start = max(start, float(p.timestep_end))
    return replace(
        p,
        self_attention_skip_range=SELF_RANGE if p.self_attention_skip_range is None else p.self_attention_skip_range,
        cross_attention_skip_range=CROSS_RANGE if p.cross_attention_skip_range is None else p.cross_attention_skip_range,
        timestep_start=start if p.timestep_start is None else float(p.timestep_start),
        timestep_end=end if p.timestep_end is None else float(p.timestep_end),
    )


def unavailable_reason(model, calibration) -> str:
    return ""


@dataclass
class AttentionState:
    """One (expert, branch, block, kind)."""

    counter: int = 0
    output: torch.Tensor | None = None  # [1, L, C], the module's output before the gate


class Pab:
    name = "pab"

    def __init__(self, params: PabParams, stats: CacheStats):
        self.p, self.stats = params, stats
        self.ranges = {"self": params.self_attention_skip_range, "cross": params.cross_attention_skip_range}
        self.states: dict[tuple[int, int, int, str], AttentionState] = {}

    def in_window(self, t: float | None) -> bool:
        return t is not None and self.p.timestep_end < t < self.p.timestep_start

    def hooks(self, step: StepInfo, branches: tuple[int, ...]) -> ForwardHooks:
        self.stats.count("block_stack", len(branches), 0)
        return ForwardHooks(attention=partial(self._attention, step, branches))

    def close(self) -> None:
        self.states.clear()

    def _attention(self, step: StepInfo, branches: tuple[int, ...], block: int, kind: str,
                   compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        span = self.ranges[kind]
        states = [self.states.setdefault((step.expert, b, block, kind), AttentionState()) for b in branches]
        here = self.in_window(step.t)
        reuse = [here and s.output is not None and s.counter % span != 0 for s in states]
        for s in states:
            s.counter = (s.counter + 1) % step.num_steps
        # Rows of one call advance in lockstep, so they agree; if they ever did not, all rows compute.
        if all(reuse):
            out = torch.cat([s.output for s in states]) if len(states) > 1 else states[0].output
            self.stats.count(f"{kind}_attention", 0, len(states))
        else:
            out = compute()
            self.stats.count(f"{kind}_attention", len(states), 0)
        nxt = self.in_window(step.next_t)
        for r, s in enumerate(states):
            if not (nxt and s.counter % span != 0):
                s.output = None  # no later call can reuse it
            elif not reuse[r]:
                s.output = out[r:r + 1]
        return out


def create(params: PabParams, ctx: StrategyContext, stats: CacheStats) -> Pab:
    return Pab(params, stats)
