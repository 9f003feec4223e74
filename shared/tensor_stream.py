"""Tensors as protobuf streams: a spec, ~1 MiB little-endian chunks with offsets, an end frame with CRC32.

Sender: `tensor_to_frames(t)` (bare TensorFrames) or `tensor_to_messages(t, DenoiseResponse, "latents")`
(frames filled in place inside a service's message, so the chunk bytes are not copied twice), or `TensorSender`
for a tensor whose bytes come in pieces (frames sent while the rest is still being decoded).
Receiver: `TensorAssembler` (feed frames one at a time), `frames_to_tensor`, `frames_to_tensors`.
Every fault raises TensorStreamError: DATA_LOSS for corrupt bytes, INVALID_ARGUMENT for a bad spec or order.
"""

from __future__ import annotations

import asyncio
import math
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import torch

from smartdiff.shared.errors import DeadlineExceeded, RequestError, TensorStreamError
from smartdiff.shared.request import reject_unknown_fields
from smartdiff.tensor.v1 import tensor_pb2 as pb

CHUNK_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 4 << 30  # a receiver's default cap; services pass tighter limits per field
MAX_NDIM = 16
LITTLE_ENDIAN_HOST = sys.byteorder == "little"

WIRE_DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_BOOL: torch.bool,
}
TORCH_DTYPES: dict[torch.dtype, int] = {v: k for k, v in WIRE_DTYPES.items()}
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}

M = TypeVar("M")
_DATA_LOSS, _INVALID = TensorStreamError.DATA_LOSS, TensorStreamError.INVALID_ARGUMENT


def _swap_bytes(flat: torch.Tensor) -> torch.Tensor:
    """Reverse the byte order of each element of a 1-D contiguous tensor (big-endian hosts only)."""
    if flat.element_size() == 1:
        return flat
    as_int = flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy()
    return torch.from_numpy(as_int.byteswap()).view(flat.dtype)


def wire_bytes(t: torch.Tensor) -> memoryview:
    """The elements as C-contiguous little-endian bytes; no copy for a contiguous CPU tensor on this host."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if not LITTLE_ENDIAN_HOST:
        flat = _swap_bytes(flat)
    return memoryview(flat.view(torch.uint8).numpy())  # the ndarray keeps the tensor's storage alive


def tensor_spec(t: torch.Tensor, name: str = "") -> pb.TensorSpec:
    """The spec frame of a tensor."""
    return spec_of(t.dtype, t.shape, name)


def spec_of(dtype: torch.dtype, shape: Iterable[int], name: str = "") -> pb.TensorSpec:
    """The spec frame of a tensor of that dtype and shape (for a sender that has its bytes only in pieces)."""
    if dtype not in TORCH_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in TORCH_DTYPES)
        raise TensorStreamError(_INVALID, f"{name or 'tensor'}: dtype {dtype} cannot be sent; use {supported}")
    shape = list(shape)
    return pb.TensorSpec(name=name, dtype=TORCH_DTYPES[dtype], shape=shape, byte_size=math.prod(shape) * dtype.itemsize)


class TensorSender(Generic[M]):
    """Sends one tensor whose bytes come in pieces, in order, e.g. video frames as they are decoded: `start()` (the
    spec frame), `send(piece)` for each piece (chunks of at most chunk_bytes with their offsets), then `end()` (the
    CRC32 frame), which refuses a stream whose pieces did not add up to the spec's byte_size.

    `new()` makes each message and returns it with the TensorFrame to fill in place (a oneof case of a service's
    message, or a bare TensorFrame)."""

    def __init__(self, spec: pb.TensorSpec, new: Callable[[], tuple[M, pb.TensorFrame]],
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.spec, self.new, self.chunk_bytes = spec, new, chunk_bytes
        self.sent = 0
        self._crc = 0

    @classmethod
    def messages(cls, spec: pb.TensorSpec, message_cls: type[M], field: str,
                 chunk_bytes: int = CHUNK_BYTES) -> "TensorSender[M]":
        """A sender whose frames travel in `message_cls` messages' TensorFrame `field`."""

        def new() -> tuple[M, pb.TensorFrame]:
            msg = message_cls()
            return msg, getattr(msg, field)

        return cls(spec, new, chunk_bytes)

    def start(self) -> M:
        msg, frame = self.new()
        frame.spec.CopyFrom(self.spec)
        return msg

    def send(self, piece: torch.Tensor) -> Iterator[M]:
        """The chunks of the next piece of the tensor's bytes (the piece's elements in C order)."""
        data = wire_bytes(piece)
        if self.sent + len(data) > self.spec.byte_size:
            raise ValueError(f"{self.spec.name or 'tensor'}: pieces run past byte_size {self.spec.byte_size} "
                             f"(to {self.sent + len(data)})")
        for offset in range(0, len(data), self.chunk_bytes):
            piece_bytes = data[offset : offset + self.chunk_bytes]  # a view; bytes() below is the one copy per chunk
            self._crc = zlib.crc32(piece_bytes, self._crc)
            msg, frame = self.new()
            frame.chunk.offset = self.sent + offset
            frame.chunk.data = bytes(piece_bytes)
            yield msg
        self.sent += len(data)

    def end(self) -> M:
        if self.sent != self.spec.byte_size:
            raise ValueError(f"{self.spec.name or 'tensor'}: sent {self.sent} of {self.spec.byte_size} bytes")
        msg, frame = self.new()
        frame.end.crc32 = self._crc
        return msg


def _send_whole(t: torch.Tensor, sender: Callable[[pb.TensorSpec], TensorSender[M]], name: str) -> Iterator[M]:
    out = sender(tensor_spec(t, name))
    yield out.start()
    yield from out.send(t)
    yield out.end()


def _bare_frame() -> tuple[pb.TensorFrame, pb.TensorFrame]:
    frame = pb.TensorFrame()
    return frame, frame


def tensor_to_frames(
    t: torch.Tensor, name: str = "", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorFrame]:
    """Stream `t` as TensorFrames: spec, chunks of `chunk_bytes` with offsets, end with the CRC32."""
    return _send_whole(t, lambda spec: TensorSender(spec, _bare_frame, chunk_bytes), name)


def tensor_to_messages(
    t: torch.Tensor, message_cls: type[M], field: str, name: str = "", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[M]:
    """Stream `t` as `message_cls` messages whose TensorFrame `field` (a oneof case) carries each frame."""
    return _send_whole(t, lambda spec: TensorSender.messages(spec, message_cls, field, chunk_bytes), name or field)


class TensorAssembler:
    """Rebuild one tensor from its frames: `feed` each frame; the end frame returns the tensor."""

    def __init__(self, field: str = "tensor", max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.field = field  # names the tensor in error messages, e.g. "prompt_embeds"
        self.max_bytes = max_bytes
        self.spec: pb.TensorSpec | None = None
        self.tensor: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None
        self._view: memoryview | None = None
        self._received = 0
        self._crc = 0

    @property
    def started(self) -> bool:
        return self.spec is not None

    @property
    def done(self) -> bool:
        return self.tensor is not None

    def _fail(self, kind, message: str) -> TensorStreamError:
        return TensorStreamError(kind, f"{self.field}: {message}")

    def feed(self, frame: pb.TensorFrame) -> torch.Tensor | None:
        """Consume one frame; return the tensor after the end frame, else None."""
        if self.done:
            raise self._fail(_INVALID, "frame after the end frame")
        kind = frame.WhichOneof("frame")
        if kind == "spec":
            self._start(frame.spec)
        elif kind == "chunk":
            self._add(frame.chunk.offset, frame.chunk.data)
        elif kind == "end":
            return self._finish(frame.end.crc32)
        else:
            raise self._fail(_INVALID, "empty frame (none of spec, chunk, end set)")
        return None

    def _start(self, spec: pb.TensorSpec) -> None:
        if self.started:
            raise self._fail(_INVALID, "second spec frame")
        if spec.dtype not in WIRE_DTYPES:
            name = pb.Dtype.Name(spec.dtype) if spec.dtype in pb.Dtype.values() else str(spec.dtype)
            raise self._fail(_INVALID, f"unknown or unsupported dtype {name}")
        shape = list(spec.shape)
        if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
            raise self._fail(_INVALID, f"invalid shape {shape} (at most {MAX_NDIM} non-negative dimensions)")
        dtype = WIRE_DTYPES[spec.dtype]
        spanned = math.prod(d for d in shape if d) * dtype.itemsize  # an empty tensor's other dims count too
        if spanned > self.max_bytes:
            raise self._fail(_INVALID, f"invalid shape {shape}: its non-zero dimensions span {spanned} bytes, past "
                                       f"the limit of {self.max_bytes} bytes")
        expected = math.prod(shape) * dtype.itemsize
        if spec.byte_size != expected:
            raise self._fail(
                _INVALID,
                f"byte_size {spec.byte_size} does not match shape {shape} of "
                f"{pb.Dtype.Name(spec.dtype)} ({expected} bytes)",
            )
        if expected > self.max_bytes:
            raise self._fail(_INVALID, f"{expected} bytes exceed the limit of {self.max_bytes} bytes")
        self.spec = spec
        self._buf = torch.empty(expected, dtype=torch.uint8)
        self._view = memoryview(self._buf.numpy())

    def _add(self, offset: int, data: bytes) -> None:
        if not self.started:
            raise self._fail(_INVALID, "chunk before the spec frame")
        if offset != self._received:
            what = "leaves a gap" if offset > self._received else "overlaps earlier chunks"
            raise self._fail(_DATA_LOSS, f"chunk offset {offset} {what} (expected {self._received})")
        end = offset + len(data)
        if end > self.spec.byte_size:
            raise self._fail(_DATA_LOSS, f"chunks run past byte_size {self.spec.byte_size} (to {end})")
        self._view[offset:end] = data
        self._crc = zlib.crc32(data, self._crc)
        self._received = end

    def _finish(self, crc32: int) -> torch.Tensor:
        if not self.started:
            raise self._fail(_INVALID, "end frame before the spec frame")
        if self._received != self.spec.byte_size:
            raise self._fail(_DATA_LOSS, f"got {self._received} of {self.spec.byte_size} bytes")
        if self._crc != crc32:
            raise self._fail(_DATA_LOSS, f"CRC32 mismatch (sent {crc32:#010x}, received {self._crc:#010x})")
        flat = self._buf.view(WIRE_DTYPES[self.spec.dtype])
        if not LITTLE_ENDIAN_HOST:
            flat = _swap_bytes(flat)
        self.tensor = flat.reshape(list(self.spec.shape))
        self._buf = self._view = None
        return self.tensor

    def result(self) -> torch.Tensor:
        """The tensor; INVALID_ARGUMENT if none was sent (a missing field), DATA_LOSS if the stream ended before
        its end frame (a cut-off one)."""
        if self.tensor is None:
            if not self.started:
                raise self._fail(_INVALID, "required, and the stream ended without it (no spec frame)")
            raise self._fail(_DATA_LOSS, f"stream ended before the end frame ({self._received} of "
                                         f"{self.spec.byte_size} bytes)")
        return self.tensor


def frames_to_tensor(
    frames: Iterable[pb.TensorFrame], field: str = "tensor", max_bytes: int = DEFAULT_MAX_BYTES
) -> torch.Tensor:
    """Assemble exactly one tensor from a complete frame stream."""
    assembler = TensorAssembler(field, max_bytes)
    for frame in frames:
        assembler.feed(frame)
    return assembler.result()


def frames_to_tensors(
    frames: Iterable[pb.TensorFrame], field: str = "tensor", max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[torch.Tensor]:
    """Assemble tensors sent one after another on one stream field (e.g. Encode's embeddings)."""
    assembler: TensorAssembler | None = None
    for frame in frames:
        if assembler is None or assembler.done:
            assembler = TensorAssembler(field, max_bytes)
        out = assembler.feed(frame)
        if out is not None:
            yield out
    if assembler is not None and not assembler.done:
        assembler.result()  # raises DATA_LOSS: the last tensor was cut off


# Longest pause allowed between two messages of a stage's request stream: a client that stops uploading (stalled
# or gone without closing) loses its call, instead of holding one of the server's call slots for good.
UPLOAD_IDLE_SECONDS = 30.0


async def _messages(request_iterator, idle_seconds: float):
    """The messages of a request stream; DeadlineExceeded when none comes for idle_seconds."""
    it = aiter(request_iterator)
    while True:
        try:
            msg = await asyncio.wait_for(anext(it), idle_seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request stream: no message for {idle_seconds:g} s; send a request's messages "
                                   "without pausing") from None
        yield msg


async def read_params_and_tensors(request_iterator, assemblers: dict[str, TensorAssembler],
                                  idle_seconds: float | None = None):
    """Read a stage's client stream: one `params` frame first, then TensorFrames on the fields of `assemblers`.

    Returns the params message; the tensors are in the assemblers. RequestError (INVALID_ARGUMENT) for a stream
    out of that order; DeadlineExceeded when no message comes for idle_seconds (default UPLOAD_IDLE_SECONDS).
    """
    params = None
    async for msg in _messages(request_iterator, UPLOAD_IDLE_SECONDS if idle_seconds is None else idle_seconds):
        kind = msg.WhichOneof("frame")
        if kind == "params":
            if params is not None:
                raise RequestError("params", "must be sent once")
            params = msg.params
            reject_unknown_fields(params, "params")
        elif kind in assemblers:
            if params is None:
                raise RequestError("params", "must be the first message of the stream")
            assemblers[kind].feed(getattr(msg, kind))
        else:
            raise RequestError("frame", f"empty {type(msg).__name__} message")
    if params is None:
        raise RequestError("params", "missing: the stream ended without its parameters")
    return params
