"""Per-request FlexCache choice: a frozen CacheConfig (strategy + parameters), validated, to and from the proto.

Absent parameters stay None here; a strategy's `resolve` fills them for one model and request, and the
resolved config is what the denoiser reports back as "applied".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from smartdiff.shared.errors import RequestError


@dataclass(frozen=True)
class TeaCacheParams:
    """TeaCache (TeaCache4Wan2.1): reuse the block stack's residual while the rescaled, accumulated relative
    L1 change of the timestep embedding (or of its 6-way projection with use_ret_steps) stays below the
    threshold."""

    rel_l1_threshold: float | None = None  # 0 never skips
    warmup_steps: int | None = None  # first steps of each expert always computed
    final_steps: int | None = None  # last steps of the request always computed
    use_ret_steps: bool | None = None
    coefficients: tuple[float, ...] | None = None  # rescaling polynomial, highest degree first


@dataclass(frozen=True)
class PabParams:
    """Pyramid Attention Broadcast: inside the timestep window timestep_end < t < timestep_start, reuse each
    attention output except every `range`-th call (VideoSys' per-module counter)."""

    self_attention_skip_range: int | None = None  # 1 = always computed
    cross_attention_skip_range: int | None = None
    timestep_start: float | None = None  # upper end of the window
    timestep_end: float | None = None  # lower end of the window


@dataclass(frozen=True)
class MagCacheParams:
    """MagCache: reuse the block stack's residual while the error predicted from the calibrated magnitude
    ratios of consecutive residuals, accumulated over skipped steps, stays below the threshold."""

    threshold: float | None = None  # 0 never skips
    max_skip_steps: int | None = None  # K: most consecutive reused steps
    retention_ratio: float | None = None  # fraction of each expert's first steps always computed


@dataclass(frozen=True)
class BudgetParams:
    """Budget cache: compute this share of each expert's steps, the ones a dynamic programme over the
    calibrated reuse errors picks; the others reuse the block stack's residual of the last computed step."""

    compute_fraction: float | None = None  # 1 computes every step
    max_skip_steps: int | None = None  # most consecutive reused steps


PARAMS = {"teacache": TeaCacheParams, "pab": PabParams, "magcache": MagCacheParams, "budget": BudgetParams}
CacheParams = TeaCacheParams | PabParams | MagCacheParams | BudgetParams


@dataclass(frozen=True)
class CacheConfig:
    """One request's cache choice. strategy "none" (or "") computes everything."""

    strategy: str = "none"
    params: CacheParams | None = None

    def __post_init__(self) -> None:
        name = self.strategy or "none"
        object.__setattr__(self, "strategy", name)
        if name != "none" and name not in PARAMS:
            raise RequestError("cache.strategy", f"unknown strategy {name!r}; one of none, {', '.join(PARAMS)}")
        if self.params is not None:
            if name == "none" or not isinstance(self.params, PARAMS[name]):
                raise RequestError(f"cache.{_case(self.params)}", f"parameters do not match strategy {name!r}")
            _validate(name, self.params)

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"


def _case(params: CacheParams) -> str:
    return next(k for k, v in PARAMS.items() if isinstance(params, v))


def _validate(name: str, p: CacheParams) -> None:
    def check(field: str, ok: bool, rule: str) -> None:
        value = getattr(p, field)
        if value is not None and not ok:
            raise RequestError(f"cache.{name}.{field}", f"{rule}, got {value!r}")

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def count(v, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 1000

    if isinstance(p, TeaCacheParams):
        check("rel_l1_threshold", finite(p.rel_l1_threshold) and p.rel_l1_threshold >= 0, "must be a finite number >= 0")
        check("warmup_steps", count(p.warmup_steps, 0), "must be an integer in [0, 1000]")
        check("final_steps", count(p.final_steps, 0), "must be an integer in [0, 1000]")
        check("coefficients", p.coefficients is None or (0 < len(p.coefficients) <= 16 and all(map(finite, p.coefficients))),
              "must be 1 to 16 finite numbers, highest degree first")
    elif isinstance(p, PabParams):
        check("self_attention_skip_range", count(p.self_attention_skip_range, 1), "must be an integer in [1, 1000]")
        check("cross_attention_skip_range", count(p.cross_attention_skip_range, 1), "must be an integer in [1, 1000]")
        check("timestep_start", finite(p.timestep_start) and 0 <= p.timestep_start <= 1000, "must be in [0, 1000]")
        check("timestep_end", finite(p.timestep_end) and 0 <= p.timestep_end <= 1000, "must be in [0, 1000]")
        if p.timestep_start is not None and p.timestep_end is not None and p.timestep_end > p.timestep_start:
            raise RequestError("cache.pab.timestep_end", f"must be <= timestep_start ({p.timestep_start}), "
                               f"got {p.timestep_end}")
    elif isinstance(p, BudgetParams):
        check("compute_fraction", finite(p.compute_fraction) and 0 < p.compute_fraction <= 1, "must be in (0, 1]")
        check("max_skip_steps", count(p.max_skip_steps, 0), "must be an integer in [0, 1000]")
    else:
        check("threshold", finite(p.threshold) and p.threshold >= 0, "must be a finite number >= 0")
        check("max_skip_steps", count(p.max_skip_steps, 0), "must be an integer in [0, 1000]")
        check("retention_ratio", finite(p.retention_ratio) and 0 <= p.retention_ratio < 1, "must be in [0, 1)")


def cache_config_from_proto(msg) -> CacheConfig:
    """smartdiff.denoiser.v1.CacheConfig -> CacheConfig; RequestError(field, rule) on invalid values."""
    case = msg.WhichOneof("params")
    params = None
    if case is not None:
        sub = getattr(msg, case)
        values = {}
        for f in fields(PARAMS[case]):
            if f.name == "coefficients":
                values[f.name] = tuple(sub.coefficients) or None
            elif sub.HasField(f.name):
                values[f.name] = getattr(sub, f.name)
        params = PARAMS[case](**values)
    return CacheConfig(msg.strategy or "none", params)


def cache_config_to_proto(cfg: CacheConfig):
    """CacheConfig (typically resolved, every parameter set) -> smartdiff.denoiser.v1.CacheConfig."""
    from smartdiff.denoiser.v1 import options_pb2

    msg = options_pb2.CacheConfig(strategy=cfg.strategy)
    if cfg.params is not None:
        sub = getattr(msg, _case(cfg.params))
        sub.SetInParent()
        for f in fields(cfg.params):
            value = getattr(cfg.params, f.name)
            if f.name == "coefficients":
                sub.coefficients.extend(value or ())
            elif value is not None:
                setattr(sub, f.name, value)
    return msg
