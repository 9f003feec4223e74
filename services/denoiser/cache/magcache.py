"""MagCache (after MagCache4Wan2.1 / 2.2): skip the block stack while the predicted reuse error stays small.

The magnitude ratio ||r_i|| / ||r_(i-1)|| of consecutive block-stack residuals is nearly independent of the
prompt, so it is calibrated once per model (per CFG branch and step). Per (expert, branch), each skipped step
multiplies the accumulated ratio by the step's ratio and adds |1 - accumulated ratio| to the accumulated error;
the step reuses the cached residual while that error is below the threshold and at most K steps in a row were
reused, otherwise it computes every block and the accumulators restart. The first retention_ratio of each
expert's steps always compute. The decision reads only the step index, so it costs nothing and every rank of a
sequence-parallel group agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from smartdiff.shared.errors import RequestError

from .config import MagCacheParams
from .published import MAGCACHE_DEFAULT, MAGCACHE_DEFAULTS, MAGCACHE_RATIOS, nearest_resample, published_key
from .residual import ResidualCache, ResidualState
from .session import CacheStats, StepInfo, StrategyContext

DESCRIPTION = ("MagCache: reuse the block-stack residual while the error predicted from calibrated residual "
               "magnitude ratios stays small; threshold 0.12, max_skip_steps 2, retention_ratio 0.2 (Wan2.1-1.3B)")


def branch_ratios(ctx: StrategyContext) -> tuple[list[float], list[float]]:
    """(cond, uncond) magnitude ratio of every step of this request, resampled from the calibrated table."""
    n = ctx.schedule.num_steps
    key = published_key(ctx.model)
    if ctx.calibration is not None and ctx.calibration.magcache is not None:
        table = ctx.calibration.magcache
    elif key in MAGCACHE_RATIOS:
        table = MAGCACHE_RATIOS[key]
    elif ctx.model.random_weights:
        return [1.0] * n, [1.0] * n
    else:
        raise RequestError("cache.strategy", f"magcache needs magnitude ratios for {ctx.model.name}: fit them "
                           "with `smartdiff calibrate-cache` and start the denoiser with that file")
    return nearest_resample(table[0], n), nearest_resample(table[1], n)


def unavailable_reason(model, calibration) -> str:
    if (calibration is not None and calibration.magcache is not None) or published_key(model) in MAGCACHE_RATIOS:
        return ""
    return "" if model.random_weights else f"no MagCache ratios for {model.name}: run `smartdiff calibrate-cache`"


def resolve(params: MagCacheParams | None, ctx: StrategyContext) -> MagCacheParams:
    p = params or MagCacheParams()
    branch_ratios(ctx)  # refuse now when there is no table
    threshold, k, retention = MAGCACHE_DEFAULTS.get(published_key(ctx.model), MAGCACHE_DEFAULT)
    return replace(
        p,
        threshold=threshold if p.threshold is None else float(p.threshold),
        max_skip_steps=k if p.max_skip_steps is None else p.max_skip_steps,
        retention_ratio=retention if p.retention_ratio is None else float(p.retention_ratio),
    )


def retained_steps(ratio: float, n: int) -> int:
    """floor(ratio * n): an expert's first steps always computed. The tolerance makes a ratio sent as a float32
    (the proto: 0.7 arrives as 0.69999998) retain the steps the same decimal does in Python."""
    return math.floor(ratio * n + 1e-4)


@dataclass
class MagCacheState(ResidualState):
    ratio: float = 1.0  # product of the ratios since the last computed step
    skipped: int = 0  # steps in a row decided by the accumulators (reused, or the one that stopped them)
    error: float = 0.0  # accumulated |1 - ratio|


class MagCache(ResidualCache):
    name = "magcache"

    def __init__(self, params: MagCacheParams, ratios: tuple[list[float], list[float]], stats: CacheStats):
        super().__init__(stats)
        self.p, self.ratios = params, ratios

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def should_compute(self, state: MagCacheState, step: StepInfo, branch: int, e: torch.Tensor,
                       e6: torch.Tensor) -> bool:
        if step.expert_step < retained_steps(self.p.retention_ratio, step.expert_steps) or state.residual is None:
            return True
        state.ratio *= self.ratios[branch][step.index]
        state.skipped += 1
        state.error += abs(1.0 - state.ratio)
        if state.error < self.p.threshold and state.skipped <= self.p.max_skip_steps:
            return False
        state.ratio, state.skipped, state.error = 1.0, 0, 0.0
        return True


def create(params: MagCacheParams, ctx: StrategyContext, stats: CacheStats) -> MagCache:
    return MagCache(params, branch_ratios(ctx), stats)
