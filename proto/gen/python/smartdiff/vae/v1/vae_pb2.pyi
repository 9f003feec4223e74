from smartdiff.tensor.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_FRAMES: _ClassVar[OutputFormat]

class DecodePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECODE_PHASE_UNSPECIFIED: _ClassVar[DecodePhase]
    DECODE_PHASE_DECODING: _ClassVar[DecodePhase]
    DECODE_PHASE_ENCODING: _ClassVar[DecodePhase]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_MP4: OutputFormat
OUTPUT_FORMAT_FRAMES: OutputFormat
DECODE_PHASE_UNSPECIFIED: DecodePhase
DECODE_PHASE_DECODING: DecodePhase
DECODE_PHASE_ENCODING: DecodePhase

class DecodeRequest(_message.Message):
    __slots__ = ("params", "latents")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    params: DecodeParams
    latents: _tensor_pb2.TensorFrame
    def __init__(self, params: _Optional[_Union[DecodeParams, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ...) -> None: ...

class DecodeParams(_message.Message):
    __slots__ = ("request_id", "model", "output_format", "fps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    output_format: OutputFormat
    fps: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., fps: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("progress", "frames", "mp4", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    MP4_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: DecodeProgress
    frames: _tensor_pb2.TensorFrame
    mp4: _tensor_pb2.TensorFrame
    summary: DecodeSummary
    def __init__(self, progress: _Optional[_Union[DecodeProgress, _Mapping]] = ..., frames: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., mp4: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., summary: _Optional[_Union[DecodeSummary, _Mapping]] = ...) -> None: ...

class DecodeProgress(_message.Message):
    __slots__ = ("phase", "step", "total", "elapsed_seconds")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    phase: DecodePhase
    step: int
    total: int
    elapsed_seconds: float
    def __init__(self, phase: _Optional[_Union[DecodePhase, str]] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class DecodeSummary(_message.Message):
    __slots__ = ("output_format", "frames", "width", "height", "fps", "tiled", "video_bytes", "decode_seconds", "encode_seconds", "peak_memory_bytes", "low_mem_level")
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    TILED_FIELD_NUMBER: _ClassVar[int]
    VIDEO_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOW_MEM_LEVEL_FIELD_NUMBER: _ClassVar[int]
    output_format: OutputFormat
    frames: int
    width: int
    height: int
    fps: int
    tiled: bool
    video_bytes: int
    decode_seconds: float
    encode_seconds: float
    peak_memory_bytes: int
    low_mem_level: int
    def __init__(self, output_format: _Optional[_Union[OutputFormat, str]] = ..., frames: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[int] = ..., tiled: _Optional[bool] = ..., video_bytes: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., low_mem_level: _Optional[int] = ...) -> None: ...
