from smartdiff.tensor.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompts", "dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    dtype: _tensor_pb2.Dtype
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[_tensor_pb2.Dtype, str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embedding", "summary")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    embedding: _tensor_pb2.TensorFrame
    summary: EncodeSummary
    def __init__(self, embedding: _Optional[_Union[_tensor_pb2.TensorFrame, _Mapping]] = ..., summary: _Optional[_Union[EncodeSummary, _Mapping]] = ...) -> None: ...

class EncodeSummary(_message.Message):
    __slots__ = ("token_counts", "truncated_prompts", "encode_seconds", "device", "peak_memory_bytes", "low_mem_level")
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOW_MEM_LEVEL_FIELD_NUMBER: _ClassVar[int]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    truncated_prompts: _containers.RepeatedScalarFieldContainer[int]
    encode_seconds: float
    device: str
    peak_memory_bytes: int
    low_mem_level: int
    def __init__(self, token_counts: _Optional[_Iterable[int]] = ..., truncated_prompts: _Optional[_Iterable[int]] = ..., encode_seconds: _Optional[float] = ..., device: _Optional[str] = ..., peak_memory_bytes: _Optional[int] = ..., low_mem_level: _Optional[int] = ...) -> None: ...
