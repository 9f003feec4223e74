"""Budget cache: compute exactly the requested share of steps, the ones whose reuse would cost the most.

TeaCache and MagCache decide step by step with an accumulator and a threshold, so the speed of a request is
known only afterwards. Here the request names its budget (`compute_fraction` of each expert's steps) and the
strategy chooses, before the loop, which steps compute: the plan that minimises the predicted deviation of the
final latents, found exactly by dynamic programming. A reused step s that takes the block-stack residual of the
step d steps earlier adds

    |sigma_s - sigma_(s+1)| * err[branch][s][d]

to the latents' deviation, where err is the RMS error of the model output when step s reuses that residual
instead of its own (measured by `smartdiff calibrate-cache` on full runs: the head applied to the step's tokens
plus the old residual, against its real output) and the sigma difference is the step's share of the flow
integration. Without a calibration, err = d: the error grows with the distance, and the plan spaces the computed
steps by the schedule's step sizes.

Each (expert, CFG branch) gets its own plan; an expert's first step always computes. The plan reads only the
schedule and the calibrated table, so it costs nothing at run time, `plan_cache` predicts it exactly and every
rank of a sequence-parallel group takes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from smartdiff.shared.errors import RequestError

from .config import BudgetParams
from .residual import ResidualCache, ResidualState
from .session import CacheStats, StepInfo, StrategyContext

DESCRIPTION = ("budget: compute a fixed share of each expert's steps (compute_fraction, default 0.5), chosen by "
               "dynamic programming to minimise the deviation predicted from the calibrated reuse errors; "
               "max_skip_steps 4")
DEFAULT_FRACTION = 0.5
DEFAULT_MAX_SKIP = 4


def resolve(params: BudgetParams | None, ctx: StrategyContext) -> BudgetParams:
    p = params or BudgetParams()
    p = replace(p, compute_fraction=DEFAULT_FRACTION if p.compute_fraction is None else float(p.compute_fraction),
                max_skip_steps=DEFAULT_MAX_SKIP if p.max_skip_steps is None else p.max_skip_steps)
    table = reuse_errors(ctx)
    if table is not None and p.max_skip_steps > len(table[0][0]) - 1:
        raise RequestError("cache.budget.max_skip_steps",
                           f"the calibration measured reuse up to {len(table[0][0])} steps back, so at most "
                           f"{len(table[0][0]) - 1} steps in a row can be reused, got {p.max_skip_steps}")
    for k in sorted(set(ctx.schedule.experts)):
        n = ctx.schedule.experts.count(k)
        need = math.ceil(n / (p.max_skip_steps + 1))
        if computed_steps(p.compute_fraction, n) < need:
            raise RequestError("cache.budget.compute_fraction",
                               f"expert {k} runs {n} steps and at most {p.max_skip_steps} in a row can be reused, so "
                               f"at least {need} must compute (fraction >= {need / n:.3g}), got {p.compute_fraction:.6g}")
    return p


def unavailable_reason(model, calibration) -> str:
    return ""  # without a calibration the reuse error is taken to grow with the distance


def computed_steps(fraction: float, n: int) -> int:
    """How many of an expert's n steps compute (at least its first)."""
    return min(n, max(1, round(fraction * n)))


def reuse_errors(ctx: StrategyContext) -> tuple | None:
    """The calibrated err[branch][step][d - 1] for this request's steps, or None (no table: err = d).

    The table is per step of the calibrated step count, so a request with another count is refused."""
    cal = ctx.calibration
    if cal is None or cal.reuse_error is None:
        return None
    if cal.steps != ctx.schedule.num_steps:
        raise RequestError("cache.budget", f"the deployment's calibration of {cal.model} is for {cal.steps}-step "
                           f"runs, the request has {ctx.schedule.num_steps} steps: calibrate at that step count "
                           "(`smartdiff calibrate-cache --steps N`)")
    return cal.reuse_error


def plan(costs: list[list[float]], computed: int, max_skip: int) -> list[int]:
    """The steps to compute (sorted, first included) minimising the summed cost of the reused ones.

    costs[s][d - 1]: cost of reusing at step s the residual of step s - d (d = 1 .. max_skip + 1); exactly
    `computed` steps compute and at most `max_skip` reused steps follow each other. Dynamic programming over
    (last computed step, number computed), O(n * computed * max_skip).
    """
    n = len(costs)
    if not 1 <= computed <= n:
        raise ValueError(f"computed {computed} outside [1, {n}]")
    inf = math.inf

    def gap(p: int, q: int) -> float:
        """Cost of the steps strictly between p (computed) and q, all reusing p's residual."""
        return sum(costs[s][s - p - 1] for s in range(p + 1, q))

    best = [[inf] * (computed + 1) for _ in range(n)]  # best[q][c]: q computed, c computed in 0..q
    back = [[-1] * (computed + 1) for _ in range(n)]
    best[0][1] = 0.0
    for q in range(1, n):
        for c in range(2, min(q + 1, computed) + 1):
            for p in range(max(0, q - max_skip - 1), q):
                value = best[p][c - 1] + gap(p, q)
                if value < best[q][c]:
                    best[q][c], back[q][c] = value, p
    last, total = -1, inf
    for p in range(max(0, n - max_skip - 1), n):
        value = best[p][computed] + gap(p, n)
        if value < total:
            last, total = p, value
    if last < 0:
        raise ValueError(f"no plan computes {computed} of {n} steps with at most {max_skip} reused in a row")
    steps, c = [last], computed
    while steps[-1] > 0:
        steps.append(back[steps[-1]][c])
        c -= 1
    return steps[::-1]


class BudgetCache(ResidualCache):
    name = "budget"

    def __init__(self, params: BudgetParams, ctx: StrategyContext, stats: CacheStats):
        super().__init__(stats)
        self.p = params
        self.plans: dict[tuple[int, int], frozenset[int]] = {}  # (expert, branch) -> expert steps that compute
        schedule, table = ctx.schedule, reuse_errors(ctx)
        times = list(schedule.timesteps) + [0.0]
        for k in sorted(set(schedule.experts)):
            mine = [i for i, e in enumerate(schedule.experts) if e == k]
            for branch in (0, 1):
                costs = []
                for pos, i in enumerate(mine):  # reuse from at most pos steps back, inside this expert
                    weight = abs(times[i] - times[i + 1]) / 1000.0  # the step's sigma difference
                    costs.append([weight * (table[branch][i][d - 1] if table is not None else d)
                                  for d in range(1, min(pos, params.max_skip_steps + 1) + 1)])
                chosen = plan(costs, computed_steps(params.compute_fraction, len(mine)), params.max_skip_steps)
                self.plans[(k, branch)] = frozenset(chosen)

    def should_compute(self, state: ResidualState, step: StepInfo, branch: int, e: torch.Tensor,
                       e6: torch.Tensor) -> bool:
        return step.expert_step in self.plans[(step.expert, branch)]


def create(params: BudgetParams, ctx: StrategyContext, stats: CacheStats) -> BudgetCache:
    return BudgetCache(params, ctx, stats)
