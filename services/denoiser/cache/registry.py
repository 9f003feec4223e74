"""The registry of cache strategies: name -> how to resolve its parameters and start it for one request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import budget, magcache, pab, teacache


@dataclass(frozen=True)
class StrategyEntry:
    """resolve(params | None, ctx) -> params with every default filled in (RequestError when it cannot run);
    create(resolved params, ctx, stats) -> the request's running strategy."""

    description: str
    resolve: Callable
    create: Callable
    unavailable_reason: Callable  # (model, calibration) -> "" when it can run


STRATEGIES: dict[str, StrategyEntry] = {
    "teacache": StrategyEntry(teacache.DESCRIPTION, teacache.resolve, teacache.create, teacache.unavailable_reason),
    "pab": StrategyEntry(pab.DESCRIPTION, pab.resolve, pab.create, pab.unavailable_reason),
    "magcache": StrategyEntry(magcache.DESCRIPTION, magcache.resolve, magcache.create, magcache.unavailable_reason),
    "budget": StrategyEntry(budget.DESCRIPTION, budget.resolve, budget.create, budget.unavailable_reason),
}
