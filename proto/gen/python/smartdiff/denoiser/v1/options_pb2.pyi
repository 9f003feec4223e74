from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttentionConfig(_message.Message):
    __slots__ = ("backend", "allow_fallback", "auto", "sparge")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    SPARGE_FIELD_NUMBER: _ClassVar[int]
    backend: str
    allow_fallback: bool
    auto: AutoAttentionParams
    sparge: SpargeAttentionParams
    def __init__(self, backend: _Optional[str] = ..., allow_fallback: _Optional[bool] = ..., auto: _Optional[_Union[AutoAttentionParams, _Mapping]] = ..., sparge: _Optional[_Union[SpargeAttentionParams, _Mapping]] = ...) -> None: ...

class AutoAttentionParams(_message.Message):
    __slots__ = ("tolerance", "candidates")
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    tolerance: float
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tolerance: _Optional[float] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class SpargeAttentionParams(_message.Message):
    __slots__ = ("topk", "cdf_threshold", "sim_threshold", "pv_threshold")
    TOPK_FIELD_NUMBER: _ClassVar[int]
    CDF_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SIM_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PV_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    topk: float
    cdf_threshold: float
    sim_threshold: float
    pv_threshold: float
    def __init__(self, topk: _Optional[float] = ..., cdf_threshold: _Optional[float] = ..., sim_threshold: _Optional[float] = ..., pv_threshold: _Optional[float] = ...) -> None: ...

class CacheConfig(_message.Message):
    __slots__ = ("strategy", "teacache", "pab", "magcache", "budget")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TEACACHE_FIELD_NUMBER: _ClassVar[int]
    PAB_FIELD_NUMBER: _ClassVar[int]
    MAGCACHE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    teacache: TeaCacheParams
    pab: PabParams
    magcache: MagCacheParams
    budget: BudgetParams
    def __init__(self, strategy: _Optional[str] = ..., teacache: _Optional[_Union[TeaCacheParams, _Mapping]] = ..., pab: _Optional[_Union[PabParams, _Mapping]] = ..., magcache: _Optional[_Union[MagCacheParams, _Mapping]] = ..., budget: _Optional[_Union[BudgetParams, _Mapping]] = ...) -> None: ...

class TeaCacheParams(_message.Message):
    __slots__ = ("rel_l1_threshold", "warmup_steps", "final_steps", "use_ret_steps", "coefficients")
    REL_L1_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    USE_RET_STEPS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    rel_l1_threshold: float
    warmup_steps: int
    final_steps: int
    use_ret_steps: bool
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rel_l1_threshold: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., final_steps: _Optional[int] = ..., use_ret_steps: _Optional[bool] = ..., coefficients: _Optional[_Iterable[float]] = ...) -> None: ...

class MagCacheParams(_message.Message):
    __slots__ = ("threshold", "max_skip_steps", "retention_ratio")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_SKIP_STEPS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_RATIO_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    def __init__(self, threshold: _Optional[float] = ..., max_skip_steps: _Optional[int] = ..., retention_ratio: _Optional[float] = ...) -> None: ...

class BudgetParams(_message.Message):
    __slots__ = ("compute_fraction", "max_skip_steps")
    COMPUTE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_SKIP_STEPS_FIELD_NUMBER: _ClassVar[int]
    compute_fraction: float
    max_skip_steps: int
    def __init__(self, compute_fraction: _Optional[float] = ..., max_skip_steps: _Optional[int] = ...) -> None: ...

class PabParams(_message.Message):
    __slots__ = ("self_attention_skip_range", "cross_attention_skip_range", "timestep_start", "timestep_end")
    SELF_ATTENTION_SKIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    CROSS_ATTENTION_SKIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_START_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_END_FIELD_NUMBER: _ClassVar[int]
    self_attention_skip_range: int
    cross_attention_skip_range: int
    timestep_start: float
    timestep_end: float
    def __init__(self, self_attention_skip_range: _Optional[int] = ..., cross_attention_skip_range: _Optional[int] = ..., timestep_start: _Optional[float] = ..., timestep_end: _Optional[float] = ...) -> None: ...

class AttentionBackendInfo(_message.Message):
    __slots__ = ("name", "available", "unavailable_reason", "lossy", "dtypes", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    unavailable_reason: str
    lossy: bool
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., unavailable_reason: _Optional[str] = ..., lossy: _Optional[bool] = ..., dtypes: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class CacheStrategyInfo(_message.Message):
    __slots__ = ("name", "available", "unavailable_reason", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    unavailable_reason: str
    description: str
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., unavailable_reason: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class CacheReport(_message.Message):
    __slots__ = ("block_stack_computed", "block_stack_reused", "self_attention_computed", "self_attention_reused", "cross_attention_computed", "cross_attention_reused")
    BLOCK_STACK_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STACK_REUSED_FIELD_NUMBER: _ClassVar[int]
    SELF_ATTENTION_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    SELF_ATTENTION_REUSED_FIELD_NUMBER: _ClassVar[int]
    CROSS_ATTENTION_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    CROSS_ATTENTION_REUSED_FIELD_NUMBER: _ClassVar[int]
    block_stack_computed: int
    block_stack_reused: int
    self_attention_computed: int
    self_attention_reused: int
    cross_attention_computed: int
    cross_attention_reused: int
    def __init__(self, block_stack_computed: _Optional[int] = ..., block_stack_reused: _Optional[int] = ..., self_attention_computed: _Optional[int] = ..., self_attention_reused: _Optional[int] = ..., cross_attention_computed: _Optional[int] = ..., cross_attention_reused: _Optional[int] = ...) -> None: ...
