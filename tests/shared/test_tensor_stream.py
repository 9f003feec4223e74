"""Tensor streaming: bit-exact round trips of every wire dtype; the right error kind for each corruption."""

import zlib

import grpc
import pytest
import torch

from smartdiff.denoiser.v1 import denoiser_pb2
from smartdiff.shared import tensor_stream as ts
from smartdiff.shared.errors import TensorStreamError
from smartdiff.tensor.v1 import tensor_pb2 as pb

DATA_LOSS, INVALID = grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT


def sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.view(as_int))


@pytest.mark.parametrize("dtype", list(ts.TORCH_DTYPES))
def test_round_trip_is_bit_exact(dtype):
    x = sample(dtype)
    assert same_bits(ts.frames_to_tensor(ts.tensor_to_frames(x, "x")), x)


def test_bf16_round_trips_bit_exact_over_several_chunks():
    x = torch.randn(4096, 300).to(torch.bfloat16)  # 2.3 MiB -> 3 chunks of 1 MiB
    frames = list(ts.tensor_to_frames(x, "prompt_embeds"))
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds == ["spec", "chunk", "chunk", "chunk", "end"]
    assert [f.chunk.offset for f in frames[1:4]] == [0, 1 << 20, 2 << 20]
    assert frames[0].spec.dtype == pb.DTYPE_BFLOAT16 and list(frames[0].spec.shape) == [4096, 300]
    assert frames[-1].end.crc32 == zlib.crc32(x.view(torch.int16).numpy().tobytes())
    y = ts.frames_to_tensor(frames)
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 4)])
def test_scalar_and_empty_tensors(shape):
    x = torch.full(shape, 2.5, dtype=torch.float32)
    wire = [f.SerializeToString() for f in ts.tensor_to_frames(x)]  # empty spec/end still serialize
    frames = [pb.TensorFrame.FromString(b) for b in wire]
    y = ts.frames_to_tensor(frames)
    assert y.shape == x.shape and torch.equal(y, x)
    assert frames[0].spec.byte_size == x.numel() * 4


def test_non_contiguous_input_sent_in_logical_order():
    x = torch.arange(24, dtype=torch.int64).reshape(4, 6).t()[:, 1:3]
    assert not x.is_contiguous()
    y = ts.frames_to_tensor(ts.tensor_to_frames(x, chunk_bytes=7))
    assert torch.equal(y, x) and y.is_contiguous()


def test_wire_bytes_are_little_endian():
    data = ts.wire_bytes(torch.tensor([1], dtype=torch.int32))
    assert bytes(data) == b"\x01\x00\x00\x00"


def test_big_endian_host_swaps_both_ways(monkeypatch):
    x = sample(torch.bfloat16)
    monkeypatch.setattr(ts, "LITTLE_ENDIAN_HOST", False)  # simulate: swap on send and on receive
    frames = list(ts.tensor_to_frames(x))
    assert frames[1].chunk.data != x.view(torch.int16).numpy().tobytes()
    assert same_bits(ts.frames_to_tensor(frames), x)


def test_frames_inside_service_messages():
    x = torch.randn(16, 2, 4, 4)
    msgs = list(ts.tensor_to_messages(x, denoiser_pb2.DenoiseResponse, "latents", chunk_bytes=100))
    assert all(m.WhichOneof("frame") == "latents" for m in msgs)
    assert msgs[0].latents.spec.name == "latents"
    assert torch.equal(ts.frames_to_tensor(m.latents for m in msgs), x)


def test_several_tensors_on_one_stream():
    xs = [torch.randn(n, 8).to(torch.bfloat16) for n in (3, 11, 1)]
    frames = [f for i, x in enumerate(xs) for f in ts.tensor_to_frames(x, f"prompt_{i}", chunk_bytes=16)]
    ys = list(ts.frames_to_tensors(frames))
    assert len(ys) == 3 and all(same_bits(a, b) for a, b in zip(xs, ys, strict=True))
    with pytest.raises(TensorStreamError) as e:
        list(ts.frames_to_tensors(frames[:-1]))
    assert e.value.kind == DATA_LOSS


def test_unsupported_dtype_cannot_be_sent():
    with pytest.raises(TensorStreamError) as e:
        list(ts.tensor_to_frames(torch.zeros(2, dtype=torch.complex64)))
    assert e.value.kind == INVALID


# --- corruption cases: each is one edit of a valid 3-chunk stream ---------------------------------


def valid_frames() -> list[pb.TensorFrame]:
    return list(ts.tensor_to_frames(torch.arange(30, dtype=torch.float32), "latents", chunk_bytes=48))


def edit_spec(**fields):
    def apply(frames):
        spec = frames[0].spec
        for k, v in fields.items():
            if k == "shape":
                del spec.shape[:]
                spec.shape.extend(v)
            else:
                setattr(spec, k, v)
        return frames

    return apply


def edit_chunk(index, fn):
    """Replace the data of frames[index].chunk by fn(data)."""

    def apply(frames):
        frames[index].chunk.data = fn(frames[index].chunk.data)
        return frames

    return apply


def flip_bit(data: bytes) -> bytes:
    return data[:5] + bytes([data[5] ^ 0x10]) + data[6:]


def shift_offset(delta):
    def apply(frames):
        frames[2].chunk.offset += delta
        return frames

    return apply


def wrong_crc(frames):
    frames[-1].end.crc32 ^= 1
    return frames


CORRUPTIONS = {
    "flipped bit": (edit_chunk(2, flip_bit), DATA_LOSS, "CRC32"),
    "wrong crc in end": (wrong_crc, DATA_LOSS, "CRC32"),
    "offset gap": (shift_offset(+4), DATA_LOSS, "gap"),
    "offset overlap": (shift_offset(-4), DATA_LOSS, "overlap"),
    "missing chunk": (lambda f: f[:2] + f[3:], DATA_LOSS, "gap"),
    "truncated last chunk": (edit_chunk(3, lambda d: d[:-1]), DATA_LOSS, "of 120 bytes"),
    "extra bytes": (edit_chunk(3, lambda d: d + b"xx"), DATA_LOSS, "past"),
    "stream cut before end": (lambda f: f[:-1], DATA_LOSS, "before the end frame"),
    "no frames at all": (lambda f: [], INVALID, "required, and the stream ended without it"),
    "unknown dtype": (edit_spec(dtype=99), INVALID, "dtype"),
    "unspecified dtype": (edit_spec(dtype=pb.DTYPE_UNSPECIFIED), INVALID, "DTYPE_UNSPECIFIED"),
    "negative dim": (edit_spec(shape=[-30]), INVALID, "shape"),
    "byte_size vs shape": (edit_spec(shape=[31]), INVALID, "byte_size"),
    "empty, other dims overflow": (edit_spec(shape=[1 << 62, 1 << 62, 0], byte_size=0), INVALID, "non-zero dimensions"),
    "empty, other dims past limit": (edit_spec(shape=[1, 16, (1 << 63) - 1, 2, 0], byte_size=0), INVALID, "limit"),
    "byte_size vs dtype": (edit_spec(dtype=pb.DTYPE_FLOAT16), INVALID, "byte_size"),
    "chunk before spec": (lambda f: f[1:], INVALID, "before the spec"),
    "end before spec": (lambda f: f[-1:], INVALID, "before the spec"),
    "second spec": (lambda f: f[:1] + f, INVALID, "second spec"),
    "frame after end": (lambda f: f + f[-1:], INVALID, "after the end"),
    "empty frame": (lambda f: f[:1] + [pb.TensorFrame()] + f[1:], INVALID, "empty frame"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_gives_the_right_kind(case):
    edit, kind, words = CORRUPTIONS[case]
    with pytest.raises(TensorStreamError) as e:
        ts.frames_to_tensor(edit(valid_frames()), field="latents")
    assert e.value.kind == kind and e.value.code == kind
    assert words in str(e.value) and str(e.value).startswith("latents: ")


def test_size_limit_is_checked_before_allocating():
    frames = valid_frames()
    with pytest.raises(TensorStreamError) as e:
        ts.frames_to_tensor(frames, max_bytes=119)
    assert e.value.kind == INVALID and "limit" in str(e.value)
    huge = pb.TensorFrame(spec=pb.TensorSpec(dtype=pb.DTYPE_FLOAT32, shape=[1 << 40], byte_size=4 << 40))
    with pytest.raises(TensorStreamError, match="limit"):
        ts.TensorAssembler().feed(huge)
    assert ts.frames_to_tensor(frames, max_bytes=120).numel() == 30
