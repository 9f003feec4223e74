"""Tensor streaming throughput over a real grpc.aio loopback server: `python bench/grpc_stream_bench.py`."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc
import torch

from smartdiff.shared.grpc_server import StageServer, create_channel
from smartdiff.shared.tensor_stream import TensorAssembler, frames_to_tensor, tensor_to_frames
from smartdiff.tensor.v1 import tensor_pb2 as pb

SERVICE = "smartdiff.bench.TensorBench"
MiB = 1 << 20


class Bench:
    """Upload: client streams a tensor, server assembles it. Download: server streams a cached tensor."""

    def __init__(self) -> None:
        self.tensors: dict[int, torch.Tensor] = {}

    def tensor(self, nbytes: int) -> torch.Tensor:
        if nbytes not in self.tensors:
            self.tensors[nbytes] = torch.randn(nbytes // 2).to(torch.bfloat16)
        return self.tensors[nbytes]

    async def upload(self, request_iterator, context) -> pb.TensorEnd:
        assembler = TensorAssembler("upload", max_bytes=1 << 31)
        async for frame in request_iterator:
            assembler.feed(frame)
        return pb.TensorEnd(crc32=assembler.result().numel())

    async def download(self, request: pb.TensorSpec, context):
        for frame in tensor_to_frames(self.tensor(request.byte_size)):
            yield frame


async def measure(sizes: list[int], repeats: int) -> list[tuple[str, int, float]]:
    bench = Bench()
    server = StageServer([SERVICE], max_message_bytes=4 * MiB)
    server.server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Upload": grpc.stream_unary_rpc_method_handler(
                        bench.upload,
                        request_deserializer=pb.TensorFrame.FromString,
                        response_serializer=pb.TensorEnd.SerializeToString,
                    ),
                    "Download": grpc.unary_stream_rpc_method_handler(
                        bench.download,
                        request_deserializer=pb.TensorSpec.FromString,
                        response_serializer=pb.TensorFrame.SerializeToString,
                    ),
                },
            )
        ]
    )
    port = server.add_port("127.0.0.1:0")
    await server.start()
    rows = []
    async with create_channel(f"127.0.0.1:{port}", max_message_bytes=4 * MiB) as channel:
        upload = channel.stream_unary(
            f"/{SERVICE}/Upload",
            request_serializer=pb.TensorFrame.SerializeToString,
            response_deserializer=pb.TensorEnd.FromString,
        )
        download = channel.unary_stream(
            f"/{SERVICE}/Download",
            request_serializer=pb.TensorSpec.SerializeToString,
            response_deserializer=pb.TensorFrame.FromString,
        )
        for nbytes in sizes:
            x = bench.tensor(nbytes)

            async def up(x=x):
                assert (await upload(tensor_to_frames(x), timeout=120)).crc32 == x.numel()

            async def down(x=x, nbytes=nbytes):
                assembler = TensorAssembler("download", max_bytes=1 << 31)
                async for frame in download(pb.TensorSpec(byte_size=nbytes), timeout=120):
                    assembler.feed(frame)
                assert assembler.result().numel() == x.numel()

            async def local(x=x):
                frames_to_tensor(tensor_to_frames(x), max_bytes=1 << 31)

            for name, fn in (
                ("encode+decode, no gRPC", local),
                ("upload (client->server)", up),
                ("download (server->client)", down),
            ):
                await fn()  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    await fn()
                    times.append(time.perf_counter() - t0)
                rows.append((name, nbytes, nbytes / MiB / statistics.median(times)))
    await server.stop(0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = asyncio.run(measure([s * MiB for s in args.sizes_mib], args.repeats))
    print(f"{'path':<28}{'tensor':>10}{'MiB/s':>10}   (bf16, 1 MiB chunks, median of {args.repeats})")
    for name, nbytes, rate in rows:
        print(f"{name:<28}{nbytes // MiB:>7} MiB{rate:>10.0f}")


if __name__ == "__main__":
    main()
