"""FlexCache: feature-reuse strategies (TeaCache, PAB, MagCache, budget) chosen per request, with per-request state.

Engine side: `DenoiserEngine(..., enable_flexcache=True)`, then `denoise(..., cache=CacheConfig(...),
cache_stats=CacheStats())`. Server side: `cache_config_from_proto`, `cache_config_to_proto(stats.applied)`,
`stats.to_proto()`, `engine.flexcache.strategy_infos()`.
"""

from .config import (
    BudgetParams,
    CacheConfig,
    MagCacheParams,
    PabParams,
    TeaCacheParams,
    cache_config_from_proto,
    cache_config_to_proto,
)
from .published import CacheCalibration
from .session import CacheSession, CacheStats, FlexCache, Schedule, StepInfo

__all__ = [
    "BudgetParams", "CacheCalibration", "CacheConfig", "CacheSession", "CacheStats", "FlexCache", "MagCacheParams", "PabParams",
    "Schedule", "StepInfo", "TeaCacheParams", "cache_config_from_proto", "cache_config_to_proto",
]
