"""FlexCache runtime: the deployment's manager, one request's session, its schedule and its statistics.

A CacheSession belongs to one request. Its strategy keeps state keyed by (expert, CFG branch[, block, kind]),
hands the DiT a fresh ForwardHooks per call (nothing is stored on the model, so concurrent requests on the same
weights never share state) and drops every cached tensor in close(), which the engine calls when the request
ends, normally or not.

Sequence parallel: every decision reads only replicated values (the step index, the timestep, the timestep
embedding, published / calibrated tables), never the sharded tokens, so every rank takes the same decision
without communicating; each rank caches the residual or attention output of its own shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import RequestError

from ..dit import ForwardHooks
from .config import CacheConfig
from .published import CacheCalibration

KINDS = ("block_stack", "self_attention", "cross_attention")


@dataclass(frozen=True)
class StepInfo:
    """Where one denoising step sits in its request: global index, timestep, expert and the expert's own steps."""

    index: int
    num_steps: int
    t: float
    expert: int
    expert_step: int  # index of this step among the steps its expert runs
    expert_steps: int  # number of steps its expert runs in this request
    next_t: float | None  # timestep of this expert's next step, None if this is its last


@dataclass(frozen=True)
class Schedule:
    """The request's timesteps and the expert that runs each, known before the loop starts."""

    timesteps: tuple[float, ...]
    experts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.timesteps) != len(self.experts):
            raise ValueError("one expert per timestep")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step(self, i: int) -> StepInfo:
        k = self.experts[i]
        mine = [j for j, e in enumerate(self.experts) if e == k]
        pos = mine.index(i)
        nxt = self.timesteps[mine[pos + 1]] if pos + 1 < len(mine) else None
        return StepInfo(i, self.num_steps, float(self.timesteps[i]), k, pos, len(mine), nxt)


@dataclass
class StepRecord:
    """What the cache did in one step (all branches of that step)."""

    step: int
    expert: int
    timestep: float
    computed: Counter = field(default_factory=Counter)
    reused: Counter = field(default_factory=Counter)

    @property
    def hit(self) -> bool:
        """True when anything of this step was reused instead of computed."""
        return sum(self.reused.values()) > 0


@dataclass
class CacheStats:
    """Filled by the engine for one request (pass a fresh one to `denoise`); holds counts, never tensors.

    kinds: "block_stack" (one call per step, branch and expert), "self_attention" and "cross_attention"
    (one call per block, step, branch and expert).
    """

    strategy: str = "none"
    applied: CacheConfig | None = None  # the strategy's parameters with every default filled in
    steps: list[StepRecord] = field(default_factory=list)
    computed: Counter = field(default_factory=Counter)
    reused: Counter = field(default_factory=Counter)

    def count(self, kind: str, computed: int, reused: int) -> None:
        self.computed[kind] += computed
        self.reused[kind] += reused
        if self.steps:
            self.steps[-1].computed[kind] += computed
            self.steps[-1].reused[kind] += reused

    @property
    def cached_steps(self) -> int:
        """Block-stack forwards skipped, per branch and expert, summed (DenoiseSummary.cached_steps)."""
        return self.reused["block_stack"]

    @property
    def last_step_hit(self) -> bool:
        """Whether the step just finished reused anything (DenoiseProgress.cache_hit)."""
        return bool(self.steps) and self.steps[-1].hit

    def to_proto(self):
        """-> smartdiff.denoiser.v1.CacheReport."""
        from smartdiff.denoiser.v1 import options_pb2

        return options_pb2.CacheReport(**{f"{k}_{what}": getattr(self, what)[k]
                                          for k in KINDS for what in ("computed", "reused")})


class CacheStrategy(Protocol):
    """One request's running strategy: per-call hooks, and close() to drop its cached tensors."""

    def hooks(self, step: StepInfo, branches: tuple[int, ...]) -> ForwardHooks: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may read when it resolves its parameters and starts."""

    model: ModelConfig
    schedule: Schedule
    calibration: CacheCalibration | None
    experts: Sequence = ()  # the DiT modules (read-only; only calibration uses them)


class CustomStrategy(Protocol):
    """A strategy object passed to `denoise(cache=...)` directly (calibration, tests); bypasses the registry."""

    name: str

    def start(self, ctx: StrategyContext, stats: CacheStats) -> CacheStrategy: ...


class StepHooks:
    """The hooks of one step: `hooks(*branches)` -> ForwardHooks for a DiT call whose batch rows are those
    CFG branches (0 cond, 1 uncond)."""

    def __init__(self, strategy: CacheStrategy, info: StepInfo):
        self.strategy, self.info = strategy, info

    def __call__(self, *branches: int) -> ForwardHooks:
        return self.strategy.hooks(self.info, tuple(branches))


class CacheSession:
    """The cache state of one request."""

    def __init__(self, strategy: CacheStrategy, schedule: Schedule, stats: CacheStats):
        self.strategy: CacheStrategy | None = strategy
        self.schedule = schedule
        self.stats = stats

    def step(self, i: int) -> StepHooks:
        info = self.schedule.step(i)
        self.stats.steps.append(StepRecord(i, info.expert, info.t))
        if self.strategy is None:
            raise RuntimeError("cache session already closed")
        return StepHooks(self.strategy, info)

    def close(self) -> None:
        """Drop every cached tensor of the request (idempotent)."""
        if self.strategy is not None:
            self.strategy.close()
            self.strategy = None


class FlexCache:
    """The deployment's FlexCache manager: enabled or not (system flag), with its calibration, if any."""

    def __init__(self, model: ModelConfig, enabled: bool, calibration: CacheCalibration | None = None):
        if calibration is not None and calibration.teacache and len(calibration.teacache) != model.num_experts:
            raise ValueError(f"calibration for {calibration.model} has {len(calibration.teacache)} experts' "
                             f"TeaCache coefficients, {model.name} has {model.num_experts} experts")
        self.model, self.enabled, self.calibration = model, enabled, calibration

    def start(self, cache: CacheConfig | CustomStrategy | None, timesteps: Sequence[float],
              expert_of: Callable[[float], int], stats: CacheStats | None = None,
              experts: Sequence = ()) -> CacheSession | None:
        """Validate and resolve the request's choice and start its session; None when nothing is cached.

        Raises RequestError (before any work) when the strategy is disabled here or cannot run for this model.
        """
        from .registry import STRATEGIES

        stats = stats if stats is not None else CacheStats()
        if cache is None or (isinstance(cache, CacheConfig) and not cache.enabled):
            stats.strategy, stats.applied = "none", CacheConfig()
            return None
        schedule = Schedule(tuple(float(t) for t in timesteps), tuple(expert_of(t) for t in timesteps))
        ctx = StrategyContext(self.model, schedule, self.calibration, tuple(experts))
        if not isinstance(cache, CacheConfig):  # a custom strategy object
            stats.strategy = cache.name
            return CacheSession(cache.start(ctx, stats), schedule, stats)
        if not self.enabled:
            raise RequestError("cache.strategy", f"{cache.strategy!r}: FlexCache is disabled on this deployment "
                               "(start the denoiser with FlexCache enabled)")
        entry = STRATEGIES[cache.strategy]
        params = entry.resolve(cache.params, ctx)
        stats.strategy, stats.applied = cache.strategy, CacheConfig(cache.strategy, params)
        return CacheSession(entry.create(params, ctx, stats), schedule, stats)

    def resolve(self, cache: CacheConfig | None, timesteps: Sequence[float],
                expert_of: Callable[[float], int]) -> CacheConfig:
        """The parameters `start` would apply (for reporting before the loop); RequestError when refused."""
        stats = CacheStats()
        session = self.start(cache, timesteps, expert_of, stats)
        if session is not None:
            session.close()
        return stats.applied

    def strategy_infos(self) -> list:
        """-> [smartdiff.denoiser.v1.CacheStrategyInfo] for every registered strategy (GetCapabilities)."""
        from smartdiff.denoiser.v1 import options_pb2

        from .registry import STRATEGIES

        infos = [options_pb2.CacheStrategyInfo(name="none", available=True, description="compute every step")]
        for name, entry in STRATEGIES.items():
            reason = "" if self.enabled else "FlexCache is disabled on this deployment"
            if not reason:
                reason = entry.unavailable_reason(self.model, self.calibration)
            infos.append(options_pb2.CacheStrategyInfo(name=name, available=not reason, unavailable_reason=reason,
                                                       description=entry.description))
        return infos
