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
integration. Without a calibration, when the calibration ran another schedule (step count, sampler, shift), or
when it measured fewer distances than max_skip_steps, err = d: the error grows with the distance, and the plan
spaces the computed steps by the schedule's step sizes. Requests never fail for want of a matching calibration.

Each (expert, CFG branch) gets its own plan; an expert's first step always computes. The plan reads only the
schedule and the calibrated table, so it costs nothing at run time, `plan_cache` predicts it exactly and every
rank of a sequence-parallel group takes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
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
    for k in sorted(set(ctx.schedule.experts)):
        n = ctx.schedule.experts.count(k)
        need = math.ceil(n / (p.max_skip_steps + 1))
        if computed_steps(p.compute_fraction, n) < need:
            raise RequestError("cache.budget.compute_fraction",
                               f"expert {k} runs {n} steps and at most {p.max_skip_steps} in a row can be reused, so "
                               f"at least {need} must compute: the fraction must be above {(need - 1) / n:.4g}, "
                               f"got {p.compute_fraction:.6g}")
    return p


def unavailable_reason(model, calibration) -> str:
    return ""  # without a calibration the reuse error is taken to grow with the distance


def computed_steps(fraction: float, n: int) -> int:
    """How many of an expert's n steps compute: ceil(fraction * n), at least 1 (its first step). The tolerance
    makes a fraction sent as a float32 (the proto) give the same count as the same decimal in Python."""
    return min(n, max(1, math.ceil(fraction * n - 1e-4)))


def reuse_errors(ctx: StrategyContext) -> tuple | None:
    """The calibrated err[branch][step][d - 1] if it was measured on this request's schedule, else None.

    The table belongs to the steps of the calibration runs: it applies to a request with the same number of steps
    and, when the calibration recorded them, the same timesteps (same sampler and shift, hence the same expert for
    each step). Any other request plans with err = d, as without a calibration."""
    cal = ctx.calibration
    if cal is None or cal.reuse_error is None or cal.steps != ctx.schedule.num_steps:
        return None
    if cal.timesteps is not None and any(abs(a - b) > 0.5 for a, b in zip(cal.timesteps, ctx.schedule.timesteps)):
        return None
    return cal.reuse_error


def plan(costs: list[list[float]], computed: int, max_skip: int) -> list[int]:
    """The steps to compute (sorted, first included) minimising the summed cost of the reused ones.

    costs[s][d - 1]: cost of reusing at step s the residual of step s - d (read for d = 1 .. min(s, max_skip));
    exactly `computed` steps compute and at most `max_skip` reused steps follow each other. Dynamic programming
    over (computed step, how many computed so far): from each computed step p, the next computed step q (or the
    end) takes the running cost of the steps between them; O(n * max_skip) vector updates over the counts.
    """
    n = len(costs)
    if not 1 <= computed <= n:
        raise ValueError(f"computed {computed} outside [1, {n}]")
    max_skip = min(max_skip, n - 1)
    best = np.full((n + 1, computed + 2), np.inf)  # best[q, c]: q computes as the c-th; row n: the end
    back = np.full((n + 1, computed + 2), -1, dtype=np.int64)
    best[0, 1] = 0.0
    for p in range(n):
        row = best[p, :-1]  # reached p having computed c = 0 .. computed steps
        if not np.isfinite(row).any():
            continue
        gap, last = 0.0, min(n, p + max_skip + 1)
        for q in range(p + 1, last + 1):  # steps p+1 .. q-1 reuse p's residual; gap is their cost
            if q == n:
                if row[computed] + gap < best[n, computed]:
                    best[n, computed], back[n, computed] = row[computed] + gap, p
                break
            candidate = row + gap
            better = candidate < best[q, 1:]
            best[q, 1:][better], back[q, 1:][better] = candidate[better], p
            if q < last:
                gap += costs[q][q - p - 1]
    if back[n, computed] < 0:
        raise ValueError(f"no plan computes {computed} of {n} steps with at most {max_skip} reused in a row")
    steps, c = [int(back[n, computed])], computed
    while steps[-1] != 0:
        steps.append(int(back[steps[-1], c]))
        c -= 1
    return steps[::-1]


def plan_costs(schedule, table, max_skip: int) -> dict[tuple[int, int], list[list[float]]]:
    """(expert, branch) -> costs[pos][d - 1] over that expert's steps, for plan(); table None: err = d."""
    times = list(schedule.timesteps) + [0.0]
    out = {}
    for k in sorted(set(schedule.experts)):
        mine = [i for i, e in enumerate(schedule.experts) if e == k]
        for branch in (0, 1):
            out[(k, branch)] = [
                [abs(times[i] - times[i + 1]) / 1000.0  # the step's share of the flow integration (sigma)
                 * (table[branch][i][d - 1] if table is not None else d)
                 for d in range(1, min(pos, max_skip) + 1)]  # reuse from at most pos steps back, in this expert
                for pos, i in enumerate(mine)]
    return out


class BudgetCache(ResidualCache):
    name = "budget"

    def __init__(self, params: BudgetParams, ctx: StrategyContext, stats: CacheStats):
        super().__init__(stats)
        self.plans: dict[tuple[int, int], frozenset[int]] = {}  # (expert, branch) -> expert steps that compute
        schedule = ctx.schedule
        table = reuse_errors(ctx)
        if table is not None and params.max_skip_steps > len(table[0][0]):
            table = None  # reuse further back than the calibration measured: no table at all, as for a gap
        costs = plan_costs(schedule, table, params.max_skip_steps)
        if table is not None and not all(math.isfinite(c) for rows in costs.values() for row in rows for c in row):
            costs = plan_costs(schedule, None, params.max_skip_steps)  # a step was never measured: no table at all
        for (k, branch), rows in costs.items():
            chosen = plan(rows, computed_steps(params.compute_fraction, len(rows)), params.max_skip_steps)
            self.plans[(k, branch)] = frozenset(chosen)

    def should_compute(self, state: ResidualState, step: StepInfo, branch: int, e: torch.Tensor,
                       e6: torch.Tensor) -> bool:
        return step.expert_step in self.plans[(step.expert, branch)]


def create(params: BudgetParams, ctx: StrategyContext, stats: CacheStats) -> BudgetCache:
    return BudgetCache(params, ctx, stats)
