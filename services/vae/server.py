"""VaeService: latents in, progress per latent frame, uint8 frames streamed out as they are decoded, or an mp4."""

from __future__ import annotations

import time

import torch

from smartdiff.services.vae.engine import VaeEngine
from smartdiff.services.vae.tiling import NonFiniteVideo, TilingConfig
from smartdiff.services.vae.video import encode_mp4
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import Cancelled, RequestError, grpc_errors
from smartdiff.shared.memory import measure_peak
from smartdiff.shared.request import MAX_FPS, MAX_FRAMES, MAX_SIDE
from smartdiff.shared.tensor_stream import (TensorAssembler, TensorSender, read_params_and_tensors, spec_of,
                                           tensor_to_messages)
from smartdiff.shared.worker import Done, StageWorker
from smartdiff.vae.v1 import vae_pb2 as pb
from smartdiff.vae.v1 import vae_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VaeService"].full_name


class VaeServicer(pb_grpc.VaeServiceServicer):
    def __init__(self, model: ModelConfig, engine: VaeEngine, worker: StageWorker, tiled: bool = False):
        self.model = model
        self.engine = engine
        self.worker = worker
        self.tiled = tiled

    async def read_inputs(self, request_iterator) -> tuple[pb.DecodeParams, torch.Tensor]:
        vae = self.model.vae
        st, sh, sw = vae.stride
        limit = vae.z_dim * ((MAX_FRAMES - 1) // st + 1) * (MAX_SIDE // sh) * (MAX_SIDE // sw) * 4
        latents = TensorAssembler("latents", limit)
        params = await read_params_and_tensors(request_iterator, {"latents": latents})
        return params, latents.result()

    def validate(self, p: pb.DecodeParams, latents: torch.Tensor) -> tuple[int, int]:
        if p.model and p.model != self.model.name:
            raise RequestError("params.model", f"this deployment serves {self.model.name!r}, not {p.model!r}")
        fmt = p.output_format or pb.OUTPUT_FORMAT_MP4
        if fmt not in (pb.OUTPUT_FORMAT_MP4, pb.OUTPUT_FORMAT_FRAMES):
            raise RequestError("params.output_format", f"unknown value {fmt}")
        fps = 0  # raw frames have none (the request's fps is ignored)
        if fmt == pb.OUTPUT_FORMAT_MP4:
            fps = p.fps if p.HasField("fps") else self.model.defaults.fps
            if not 1 <= fps <= MAX_FPS:
                raise RequestError("params.fps", f"must be between 1 and {MAX_FPS}, got {fps}")
        z = self.model.vae.z_dim
        st, sh, sw = self.model.vae.stride
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != z or min(latents.shape[2:]) < 1:
            raise RequestError("latents", f"must be [1, {z}, F', H/{sh}, W/{sw}] with F', H/{sh}, W/{sw} >= 1, got "
                                          f"{list(latents.shape)}")
        f, h, w = latents.shape[2:]
        if h % 2 or w % 2:
            raise RequestError("latents", "height and width must be even in latent space (multiples of 16 pixels)")
        if (f - 1) * st + 1 > MAX_FRAMES or h * sh > MAX_SIDE or w * sw > MAX_SIDE:
            raise RequestError("latents", f"decode to at most {MAX_FRAMES} frames and {MAX_SIDE} pixels a side; "
                                          f"{list(latents.shape)} is {(f - 1) * st + 1} frames of {w * sw}x{h * sh}")
        if latents.dtype != torch.float32:
            raise RequestError("latents", f"must be float32, got {latents.dtype}")
        if not torch.isfinite(latents).all():
            raise RequestError("latents", "must be finite (it holds NaN or infinity)")
        return fmt, fps

    def frames_shape(self, latents: torch.Tensor) -> list[int]:
        """[F, H, W, 3]: the uint8 frames the latents decode to."""
        (st, sh, sw), (f, h, w) = self.model.vae.stride, latents.shape[2:]
        return [st * (f - 1) + 1, sh * h, sw * w, 3]

    @grpc_errors
    async def Decode(self, request_iterator, context):
        """Frames stream out as they are decoded (each latent frame's video frames, while the next decodes); an mp4
        is encoded the same way, frame pieces going to ffmpeg while the next decodes, and sent when it is done."""
        params, latents = await self.read_inputs(request_iterator)
        fmt, fps = self.validate(params, latents)
        shape = self.frames_shape(latents)
        start = time.perf_counter()

        def job(emit, should_stop):
            if should_stop():  # cancelled, or past its deadline while it waited in the queue: skip the decode
                raise Cancelled("cancelled before the decode started")

            def progress(phase, unit):
                def report(i, n):
                    emit((phase, i, n))
                    if should_stop():
                        raise Cancelled(f"cancelled after {unit} {i}/{n}")
                return report

            decoded = [time.perf_counter()]  # the job's start (after any wait in the queue), then each piece's end

            def pieces():  # [T, H, W, 3] on the CPU, timed before the receiver (gRPC or ffmpeg) takes them
                for piece in self.engine.decode_pieces(latents.to(self.engine.device),
                                                       progress=progress(pb.DECODE_PHASE_DECODING, "latent frame")):
                    decoded.append(time.perf_counter())
                    yield piece[0]

            video = None
            with measure_peak(self.engine.device) as peak:
                try:
                    if fmt == pb.OUTPUT_FORMAT_MP4:
                        video = encode_mp4(pieces(), fps=fps, total=shape[0],
                                           progress=progress(pb.DECODE_PHASE_ENCODING, "video frame"))
                    else:
                        for piece in pieces():
                            emit(piece)
                except NonFiniteVideo as e:  # it would be a black video with status OK
                    raise RequestError("latents", str(e)) from None
            encode_s = time.perf_counter() - decoded[-1] if video is not None else 0.0
            return video, decoded[-1] - decoded[0], encode_s, peak

        frames = TensorSender.messages(spec_of(torch.uint8, shape, "frames"), pb.DecodeResponse, "frames")
        result = None
        async for item in self.worker.stream(job, context):
            if isinstance(item, Done):
                result = item.value
            elif isinstance(item, torch.Tensor):  # a piece of the frames
                if frames.sent == 0:
                    yield frames.start()
                for msg in frames.send(item):
                    yield msg
            else:
                yield pb.DecodeResponse(progress=pb.DecodeProgress(
                    phase=item[0], step=item[1], total=item[2], elapsed_seconds=time.perf_counter() - start))
        video, decode_s, encode_s, peak = result
        if video is None:
            yield frames.end()
            size = frames.sent
        else:
            for msg in tensor_to_messages(torch.frombuffer(bytearray(video), dtype=torch.uint8), pb.DecodeResponse,
                                          "mp4", "video.mp4"):
                yield msg
            size = len(video)
        f, h, w, _ = shape
        yield pb.DecodeResponse(summary=pb.DecodeSummary(
            output_format=fmt, frames=f, width=w, height=h, fps=fps, tiled=self.tiled,
            video_bytes=size, decode_seconds=decode_s, encode_seconds=encode_s,
            peak_memory_bytes=peak.bytes or 0, low_mem_level=int(self.engine.memory.level),
        ))


def warmup_latents(model: ModelConfig, device: torch.device | str) -> torch.Tensor:
    """What the VAE decodes before SERVING: on CUDA two latent frames at the model's default size (its fused
    kernels are built for the usual request's shapes: fused.py), elsewhere a tiny latent."""
    if torch.device(device).type != "cuda":
        return torch.zeros(1, model.vae.z_dim, 1, 2, 2)
    d, (_, sh, sw) = model.defaults, model.vae.stride
    return torch.zeros(1, model.vae.z_dim, 2, d.height // sh, d.width // sw)


async def start(model: ModelConfig, layout, system, address: str, dtype: torch.dtype = torch.float32,
                tiling: TilingConfig | None = None):
    """Load the VAE, warm up (warmup_latents), serve on `address`. dtype: the compute dtype, float32 unless the
    deployment asks (`--dtype`): Wan decodes in float32; bfloat16 halves the untiled memory and the tiled time
    (docs/benchmarks.md). tiling: the tiles of levels >= 1 (default TilingConfig.for_dtype)."""
    from smartdiff.shared.serving import start_stage

    level = system.low_mem_level  # 1 and up: tiled decode
    if layout is None:
        engine = VaeEngine.random(model.vae, system.device, dtype, seed=0, low_mem_level=level, tiling=tiling)
    else:
        engine = VaeEngine.from_checkpoint(layout.vae, layout.kind, model.vae, system.device, dtype,
                                           low_mem_level=level, tiling=tiling)
    servicer = VaeServicer(model, engine, StageWorker("vae", system.max_queue, engine.device), tiled=engine.tiling is not None)
    warm = warmup_latents(model, engine.device)
    return await start_stage(SERVICE_NAME, pb_grpc.add_VaeServiceServicer_to_server, servicer, address,
                             system.max_queue, warmup=lambda: list(engine.decode_pieces(warm.to(engine.device))))
