"""VAE engine (no gRPC): normalised latents from the DiT -> uint8 video frames, and video -> latents."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from smartdiff.services.vae.model import WanVAE
from smartdiff.services.vae.tiling import (NON_FINITE, FloatSink, NonFiniteVideo, TilingConfig, Uint8Sink, check_finite,
                                           decode_tiled)
from smartdiff.services.vae.weights import load_vae
from smartdiff.shared.checkpoint import materialize_random
from smartdiff.shared.config import VAEConfig
from smartdiff.shared.memory import MemoryPolicy

Progress = Callable[[int, int], None]


class VaeEngine:
    """Holds one WanVAE on a device. Latents cross this API normalised, as the DiT sees them:
    z_norm = (z - latents_mean) / latents_std per channel.

    dtype is the compute dtype (float32 by default, as Wan decodes); inputs and float outputs are float32.

    low_mem_level >= 1 (shared/memory.py): decode in overlapping spatial tiles (`tiling`, default
    TilingConfig.for_dtype(dtype); an explicit `tiling` turns tiles on at level 0 too), frames returned on the
    CPU, and the encoder (unused by text-to-video) kept on the CPU and moved in only while encoding.
    """

    def __init__(self, model: WanVAE, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 low_mem_level: int | MemoryPolicy = 0, tiling: TilingConfig | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config: VAEConfig = model.config
        self.device = torch.device(device)
        if self.device.type == "cuda":  # the layout cuDNN's convolutions read: no conversion around each one
            model.use_channels_last()
        self.dtype = dtype
        self.memory = MemoryPolicy.resolve(low_mem_level, self.device, "vae")
        if tiling is None and self.memory.vae_tiling:
            tiling = TilingConfig.for_dtype(dtype)
        self.tiling = tiling
        self.frames_device = torch.device("cpu") if self.memory.vae_tiling else self.device
        self._encoder_parked = self.memory.vae_tiling and self.device.type != "cpu"
        if self._encoder_parked:
            self._move_encoder("cpu")
        shape = (1, self.config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(self.config.latents_mean, device=self.device).view(shape)
        self.inv_std = 1.0 / torch.tensor(self.config.latents_std, device=self.device).view(shape)

    @classmethod
    def from_checkpoint(cls, source: str | Path, kind: str, config: VAEConfig,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        low_mem_level: int | MemoryPolicy = 0,
                        tiling: TilingConfig | None = None) -> "VaeEngine":
        """Load `Wan2.1_VAE.pth` (kind "wan") or a Diffusers `vae/` folder (kind "diffusers")."""
        MemoryPolicy.resolve(low_mem_level, device, "vae")  # refuse before reading weights
        return cls(load_vae(source, kind, config, device, dtype), device, dtype, low_mem_level, tiling)

    @classmethod
    def random(cls, config: VAEConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, low_mem_level: int | MemoryPolicy = 0,
               tiling: TilingConfig | None = None) -> "VaeEngine":
        """Deterministic random weights (the random-weight presets; output is noise)."""
        with torch.device("meta"):
            model = WanVAE(config)
        return cls(materialize_random(model, device, dtype, seed), device, dtype, low_mem_level, tiling)

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """latents [B, z_dim, F', h, w] (normalised) -> video float32 [B, 3, 4(F'-1)+1, 8h, 8w] in [-1, 1],
        contiguous."""
        return self._decode_float(latents, progress).contiguous()

    def _decode_float(self, latents: torch.Tensor, progress: Progress | None) -> torch.Tensor:
        """decode_float in the model's layout (channels-last on CUDA)."""
        z = self._unnormalise(latents)
        if self.tiling is not None:
            sink = FloatSink(self._video_shape(z), self.device)
            decode_tiled(self.model, z, self.tiling, sink, progress)
            return sink.video
        video = self.model.decode(z, progress)
        return video.float().clamp_(-1.0, 1.0)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """latents [B, z_dim, F', h, w] (normalised) -> frames uint8 [B, F, H, W, 3] (RGB), on `frames_device`
        (the CPU when tiled)."""
        if self.tiling is None:
            return to_uint8_frames(self._decode_float(latents, progress))  # channels-last: no transpose
        z = self._unnormalise(latents)
        sink = Uint8Sink(self._video_shape(z), self.device, self.frames_device)
        decode_tiled(self.model, z, self.tiling, sink, progress)
        return sink.result()

    @torch.inference_mode()
    def decode_pieces(self, latents: torch.Tensor, progress: Progress | None = None) -> Iterator[torch.Tensor]:
        """decode() in pieces, in order: uint8 frames [B, T, H, W, 3] on the CPU, the frames of each latent frame as
        soon as they are decoded (tiled: the whole video at the end), so a caller can send or encode them while the
        rest decodes. The next latent frame's work is queued on the device before a piece is handed over, so the
        device does not wait for the caller. NonFiniteVideo as soon as a piece holds NaN or infinity."""
        if self.tiling is not None:
            yield self.decode(latents, progress).cpu()
            return
        pending = None
        for _, video in self.model.decode_chunks(self._unnormalise(latents), progress=progress):
            piece = _HostCopy(video)
            if pending is not None:
                yield pending.result()
            pending = piece
        yield pending.result()

    def _unnormalise(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        z = latents.to(self.device, torch.float32) / self.inv_std + self.mean  # as WanPipeline un-normalises
        return z.to(self.dtype)

    def _video_shape(self, z: torch.Tensor) -> tuple[int, int, int, int, int]:
        st, sh, sw = self.config.stride
        b, _, f, h, w = z.shape
        return b, 3, st * (f - 1) + 1, sh * h, sw * w

    def _move_encoder(self, device: torch.device | str) -> None:
        self.model.encoder.to(device)
        self.model.conv1.to(device)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 4n+1, H, W] in [-1, 1] (H, W multiples of 8) -> normalised posterior mean
        float32 [B, z_dim, n+1, H/8, W/8]."""
        self._check_video(video)
        if not self._encoder_parked:
            return self._encode(video)
        try:
            self._move_encoder(self.device)
            return self._encode(video)
        finally:
            self._move_encoder("cpu")

    @torch.inference_mode()
    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        mean, _ = self.model.encode(video.to(self.device, self.dtype))
        return ((mean.float() - self.mean) * self.inv_std).contiguous()

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, F', h, w], got {list(latents.shape)}")

    def _check_video(self, video: torch.Tensor) -> None:
        st, sh, sw = self.config.stride
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {list(video.shape)}")
        f, h, w = video.shape[2:]
        if (f - 1) % st or h % sh or w % sw:
            raise ValueError(f"video needs F = {st}n + 1 frames and H, W multiples of {sh}; "
                             f"got F={f}, H={h}, W={w}")


class _HostCopy:
    """The uint8 frames of a decoded chunk [B, 3, T, H, W], copied to the CPU behind the device's queue (pinned
    memory, no wait) with a flag saying whether the chunk was finite; result() waits for that copy only."""

    def __init__(self, video: torch.Tensor):
        finite = torch.isfinite(video).all()  # before the clamp, which would turn an infinity into +-1
        frames = _uint8(video.float().clamp_(-1.0, 1.0))
        if video.device.type != "cuda":
            self.frames, self.finite, self.done = frames, finite, None
            return
        self.frames = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True).copy_(frames, non_blocking=True)
        self.finite = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record(torch.cuda.current_stream(video.device))  # the copies' stream, whatever the current device

    def result(self) -> torch.Tensor:
        """The frames in ordinary memory: a piece can wait long for a slow receiver, and page-locked memory stays
        with the process once allocated (PyTorch caches it), so only the two pieces in flight hold any."""
        if self.done is None:
            frames = self.frames
        else:
            self.done.synchronize()
            frames = torch.empty(self.frames.shape, dtype=torch.uint8).copy_(self.frames)
        if not self.finite:
            raise NonFiniteVideo(NON_FINITE)
        return frames


def _uint8(video: torch.Tensor) -> torch.Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]: round((x + 1) / 2 * 255), as diffusers."""
    x = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]: round((x + 1) / 2 * 255), as diffusers;
    NonFiniteVideo if it holds NaN or infinity."""
    check_finite(video)
    return _uint8(video)
