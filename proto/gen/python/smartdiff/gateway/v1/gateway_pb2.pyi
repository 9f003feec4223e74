from smartdiff.denoiser.v1 import options_pb2 as _options_pb2
from smartdiff.tensor.v1 import tensor_pb2 as _tensor_pb2
from smartdiff.vae.v1 import vae_pb2 as _vae_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_QUEUED: _ClassVar[Stage]
    STAGE_TEXT_ENCODER: _ClassVar[Stage]
    STAGE_DENOISER: _ClassVar[Stage]
    STAGE_VAE: _ClassVar[Stage]
    STAGE_VIDEO_ENCODING: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_QUEUED: Stage
STAGE_TEXT_ENCODER: Stage
STAGE_DENOISER: Stage
STAGE_VAE: Stage
STAGE_VIDEO_ENCODING: Stage

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "negative_prompt", "width", "height", "frames", "steps", "guidance", "shift", "sampler", "seed", "attention", "cache", "output_format", "fps", "return_latents")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
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
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    negative_prompt: str
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
    output_format: _vae_pb2.OutputFormat
    fps: int
    return_latents: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Iterable[float]] = ..., shift: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., attention: _Optional[_Union[_options_pb2.AttentionConfig, _Mapping]] = ..., cache: _Optional[_Union[_options_pb2.CacheConfig, _Mapping]] = ..., output_format: _Optional[_Union[_vae_pb2.OutputFormat, str]] = ..., fps: _Optional[int] = ..., return_latents: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("progress", "frames", "mp4", "summary", "latents")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    MP4_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    progress: GenerateProgress
    frames: _tensor_pb2.TensorFrame
    mp4: _tensor_pb2.TensorFrame
    summary: GenerateSummary
    latents: _tensor_pb2.TensorFrame
    def __init__(self, progress: _Optional[_Union[GenerateProgress, _Mapping]] = ..., frames: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., mp4: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ...) -> None: ...

class GenerateProgress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "elapsed_seconds", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    step: int
    total_steps: int
    elapsed_seconds: float
    message: str
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class EffectiveSettings(_message.Message):
    __slots__ = ("model", "negative_prompt", "width", "height", "frames", "steps", "guidance", "shift", "sampler", "seed", "attention", "attention_selection", "cache", "output_format", "fps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SELECTION_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    guidance: _containers.RepeatedScalarFieldContainer[float]
    shift: float
    sampler: str
    seed: int
    attention: _options_pb2.AttentionConfig
    attention_selection: str
    cache: _options_pb2.CacheConfig
    output_format: _vae_pb2.OutputFormat
    fps: int
    def __init__(self, model: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Iterable[float]] = ..., shift: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., attention: _Optional[_Union[_options_pb2.AttentionConfig, _Mapping]] = ..., attention_selection: _Optional[str] = ..., cache: _Optional[_Union[_options_pb2.CacheConfig, _Mapping]] = ..., output_format: _Optional[_Union[_vae_pb2.OutputFormat, str]] = ..., fps: _Optional[int] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds", "compute_seconds", "peak_memory_bytes", "low_mem_level")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOW_MEM_LEVEL_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    seconds: float
    compute_seconds: float
    peak_memory_bytes: int
    low_mem_level: int
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., low_mem_level: _Optional[int] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("request_id", "settings", "stage_timings", "total_seconds", "video_bytes", "cached_steps", "cache_report", "denoiser_world_size", "truncated_prompts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_REPORT_FIELD_NUMBER: _ClassVar[int]
    DENOISER_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    settings: EffectiveSettings
    stage_timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    total_seconds: float
    video_bytes: int
    cached_steps: int
    cache_report: _options_pb2.CacheReport
    denoiser_world_size: int
    truncated_prompts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., settings: _Optional[_Union[EffectiveSettings, _Mapping]] = ..., stage_timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., total_seconds: _Optional[float] = ..., video_bytes: _Optional[int] = ..., cached_steps: _Optional[int] = ..., cache_report: _Optional[_Union[_options_pb2.CacheReport, _Mapping]] = ..., denoiser_world_size: _Optional[int] = ..., truncated_prompts: _Optional[_Iterable[str]] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDefaults(_message.Message):
    __slots__ = ("width", "height", "frames", "steps", "guidance", "shift", "sampler", "negative_prompt", "fps")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    frames: int
    steps: int
    guidance: _containers.RepeatedScalarFieldContainer[float]
    shift: float
    sampler: str
    negative_prompt: str
    fps: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Iterable[float]] = ..., shift: _Optional[float] = ..., sampler: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., fps: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "description", "num_experts", "defaults")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    num_experts: int
    defaults: ModelDefaults
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., num_experts: _Optional[int] = ..., defaults: _Optional[_Union[ModelDefaults, _Mapping]] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_width", "max_height", "max_frames", "max_steps")
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    max_width: int
    max_height: int
    max_frames: int
    max_steps: int
    def __init__(self, max_width: _Optional[int] = ..., max_height: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_steps: _Optional[int] = ...) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("models", "default_model", "samplers", "attention_backends", "default_attention_backend", "cache_strategies", "output_formats", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CACHE_STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    samplers: _containers.RepeatedScalarFieldContainer[str]
    attention_backends: _containers.RepeatedCompositeFieldContainer[_options_pb2.AttentionBackendInfo]
    default_attention_backend: str
    cache_strategies: _containers.RepeatedCompositeFieldContainer[_options_pb2.CacheStrategyInfo]
    output_formats: _containers.RepeatedScalarFieldContainer[_vae_pb2.OutputFormat]
    limits: RequestLimits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., samplers: _Optional[_Iterable[str]] = ..., attention_backends: _Optional[_Iterable[_Union[_options_pb2.AttentionBackendInfo, _Mapping]]] = ..., default_attention_backend: _Optional[str] = ..., cache_strategies: _Optional[_Iterable[_Union[_options_pb2.CacheStrategyInfo, _Mapping]]] = ..., output_formats: _Optional[_Iterable[_Union[_vae_pb2.OutputFormat, str]]] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ...) -> None: ...
