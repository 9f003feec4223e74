"""TeaCache for Wan (after TeaCache4Wan2.1): skip the block stack while the timestep input barely changed.

Per (expert, branch) and step: the relative L1 change of the timestep embedding e (or of its 6-way projection
e6 in ret-steps mode) since the previous step, rescaled by the model's polynomial, is accumulated; while the
sum stays below the threshold the step reuses the branch's cached block-stack residual, otherwise it computes
every block and the sum restarts at 0. Warm-up steps (per expert) and final steps always compute and reset the
sum; the previous input is updated every step, computed or not. Threshold 0 never skips.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from smartdiff.shared.errors import RequestError

from .config import TeaCacheParams
from .published import TEACACHE_COEFFICIENTS, TEACACHE_DEFAULT_THRESHOLD, TEACACHE_THRESHOLDS, published_key
from .residual import ResidualCache, ResidualState
from .session import CacheStats, StepInfo, StrategyContext

DESCRIPTION = ("TeaCache: reuse the block-stack residual while the rescaled timestep-embedding change stays small; "
               "rel_l1_threshold (Wan2.1 1.3B 0.08, 14B 0.2; 0.1 with use_ret_steps on 1.3B), warmup_steps 1 / "
               "final_steps 1 (5 / 0 with use_ret_steps)")
IDENTITY = (1.0, 0.0)  # random-weight presets: the raw relative L1 change


def polynomial(coefficients: tuple[float, ...], x: float) -> float:
    """Evaluate a polynomial given highest degree first (numpy.poly1d order)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def expert_polynomials(ctx: StrategyContext, use_ret_steps: bool,
                       override: tuple[float, ...] | None) -> list[tuple[float, ...]]:
    """One rescaling polynomial per expert: the request's, the deployment's calibrated, or the published one."""
    n = ctx.model.num_experts
    if override:
        return [tuple(override)] * n
    if ctx.calibration is not None and ctx.calibration.teacache:
        return [pair[int(use_ret_steps)] for pair in ctx.calibration.teacache]
    key = published_key(ctx.model)
    if key in TEACACHE_COEFFICIENTS:
        return [TEACACHE_COEFFICIENTS[key][int(use_ret_steps)]] * n
    if ctx.model.random_weights:
        return [IDENTITY] * n
    raise RequestError("cache.teacache.coefficients",
                       f"{ctx.model.name} has no published TeaCache coefficients (none exist for Wan2.2): pass "
                       "coefficients, or fit them with `smartdiff calibrate-cache` and start the denoiser with that file")


def unavailable_reason(model, calibration) -> str:
    if calibration is not None and calibration.teacache:
        return ""
    if published_key(model) in TEACACHE_COEFFICIENTS or model.random_weights:
        return ""
    return f"no TeaCache coefficients for {model.name}: run `smartdiff calibrate-cache` (or pass coefficients)"


def resolve(params: TeaCacheParams | None, ctx: StrategyContext) -> TeaCacheParams:
    p = params or TeaCacheParams()
    ret = bool(p.use_ret_steps)
    key = published_key(ctx.model)
    calibrated = not p.coefficients and ctx.calibration is not None and bool(ctx.calibration.teacache)
    default_threshold = (TEACACHE_THRESHOLDS[key][ret] if key in TEACACHE_THRESHOLDS and not calibrated
                         else TEACACHE_DEFAULT_THRESHOLD)
    polys = expert_polynomials(ctx, ret, p.coefficients)
    return replace(
        p,
        rel_l1_threshold=default_threshold if p.rel_l1_threshold is None else float(p.rel_l1_threshold),
        warmup_steps=(5 if ret else 1) if p.warmup_steps is None else p.warmup_steps,
        final_steps=(0 if ret else 1) if p.final_steps is None else p.final_steps,
        use_ret_steps=ret,
        coefficients=polys[0] if len(set(polys)) == 1 else None,  # per-expert ones are not echoed
    )


@dataclass
class TeaCacheState(ResidualState):
    previous: torch.Tensor | None = None  # the last step's indicator, [C] or [6, C] float32
    accumulated: float = 0.0


class TeaCache(ResidualCache):
    name = "teacache"

    def __init__(self, params: TeaCacheParams, polynomials: list[tuple[float, ...]], stats: CacheStats):
        super().__init__(stats)
        self.p, self.polynomials = params, polynomials

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def keep_residual(self, step: StepInfo) -> bool:
        return step.next_t is not None and step.index + 1 < step.num_steps - self.p.final_steps

    def should_compute(self, state: TeaCacheState, step: StepInfo, branch: int, e: torch.Tensor,
                       e6: torch.Tensor) -> bool:
        indicator = e6 if self.p.use_ret_steps else e
        forced = (step.expert_step < self.p.warmup_steps or step.index >= step.num_steps - self.p.final_steps
                  or state.previous is None or state.residual is None)
        if forced:
            compute, state.accumulated = True, 0.0
        else:
            prev = state.previous
            rel = ((indicator - prev).abs().mean() / prev.abs().mean()).item()
            state.accumulated += polynomial(self.polynomials[step.expert], rel)
            compute = self.p.rel_l1_threshold <= 0 or not state.accumulated < self.p.rel_l1_threshold
            if compute:
                state.accumulated = 0.0
        state.previous = indicator.detach().clone()
        return compute


def create(params: TeaCacheParams, ctx: StrategyContext, stats: CacheStats) -> TeaCache:
    return TeaCache(params, expert_polynomials(ctx, params.use_ret_steps, params.coefficients), stats)
