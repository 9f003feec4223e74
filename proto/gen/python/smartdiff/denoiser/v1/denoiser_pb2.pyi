from smartdiff.denoiser.v1 import options_pb2 as _options_pb2
from smartdiff.tensor.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("params", "prompt_embeds", "negative_prompt_embeds")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    params: DenoiseParams
    prompt_embeds: _tensor_pb2.TensorFrame
    negative_prompt_embeds: _tensor_pb2.TensorFrame
    def __init__(self, params: _Optional[_Union[DenoiseParams, _Mapping]] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ...) -> None: ...

class DenoiseParams(_message.Message):
    __slots__ = ("request_id", "model", "width", "height", "frames", "steps", "guidance", "shift", "sampler", "seed", "attention", "cache")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    width: int
    height: int
    frames: int
    steps: int
    guidance: _containers.RepeatedScalarFieldContainer[float]
    shift: float
    sampler: str
    seed: int
    attention: _options_pb2.AttentionConfig
    cache: _options_pb2.CacheConfig
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Iterable[float]] = ..., shift: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., attention: _Optional[_Union[_options_pb2.AttentionConfig, _Mapping]] = ..., cache: _Optional[_Union[_options_pb2.CacheConfig, _Mapping]] = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("progress", "latents", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: DenoiseProgress
    latents: _tensor_pb2.TensorFrame
    summary: DenoiseSummary
    def __init__(self, progress: _Optional[_Union[DenoiseProgress, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., summary: _Optional[_Union[DenoiseSummary, _Mapping]] = ...) -> None: ...

class DenoiseProgress(_message.Message):
    __slots__ = ("step", "total_steps", "timestep", "expert", "cache_hit", "elapsed_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    timestep: float
    expert: int
    cache_hit: bool
    elapsed_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., timestep: _Optional[float] = ..., expert: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class DenoiseSummary(_message.Message):
    __slots__ = ("effective", "attention_selection", "cached_steps", "denoise_seconds", "world_size", "peak_memory_bytes", "cache_report", "low_mem_level")
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SELECTION_FIELD_NUMBER: _ClassVar[int]
    CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_REPORT_FIELD_NUMBER: _ClassVar[int]
    LOW_MEM_LEVEL_FIELD_NUMBER: _ClassVar[int]
    effective: DenoiseParams
    attention_selection: str
    cached_steps: int
    denoise_seconds: float
    world_size: int
    peak_memory_bytes: int
    cache_report: _options_pb2.CacheReport
    low_mem_level: int
    def __init__(self, effective: _Optional[_Union[DenoiseParams, _Mapping]] = ..., attention_selection: _Optional[str] = ..., cached_steps: _Optional[int] = ..., denoise_seconds: _Optional[float] = ..., world_size: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., cache_report: _Optional[_Union[_options_pb2.CacheReport, _Mapping]] = ..., low_mem_level: _Optional[int] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("models", "samplers", "attention_backends", "cache_strategies", "default_attention_backend", "world_size")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    samplers: _containers.RepeatedScalarFieldContainer[str]
    attention_backends: _containers.RepeatedCompositeFieldContainer[_options_pb2.AttentionBackendInfo]
    cache_strategies: _containers.RepeatedCompositeFieldContainer[_options_pb2.CacheStrategyInfo]
    default_attention_backend: str
    world_size: int
    def __init__(self, models: _Optional[_Iterable[str]] = ..., samplers: _Optional[_Iterable[str]] = ..., attention_backends: _Optional[_Iterable[_Union[_options_pb2.AttentionBackendInfo, _Mapping]]] = ..., cache_strategies: _Optional[_Iterable[_Union[_options_pb2.CacheStrategyInfo, _Mapping]]] = ..., default_attention_backend: _Optional[str] = ..., world_size: _Optional[int] = ...) -> None: ...
