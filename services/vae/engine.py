"""VAE engine (no gRPC): normalised latents from the DiT -> uint8 video frames, and video -> latents."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from smartdiff.services.vae.model import WanVAE
from smartdiff.services.vae.weights import load_vae
from smartdiff.shared.checkpoint import materialize_random
from smartdiff.shared.config import VAEConfig

Progress = Callable[[int, int], None]


class VaeEngine:
    """Holds one WanVAE on a device. Latents cross this API normalised, as the DiT sees them:
    z_norm = (z - latents_mean) / latents_std per channel.

    dtype is the compute dtype (float32 by default, as Wan decodes); inputs and float outputs are float32.
    """

    def __init__(self, model: WanVAE, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.config: VAEConfig = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (1, self.config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(self.config.latents_mean, device=self.device).view(shape)
        self.inv_std = 1.0 / torch.tensor(self.config.latents_std, device=self.device).view(shape)

    @classmethod
    def from_checkpoint(cls, source: str | Path, kind: str, config: VAEConfig,
                        device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "VaeEngine":
        """Load `Wan2.1_VAE.pth` (kind "wan") or a Diffusers `vae/` folder (kind "diffusers")."""
        return cls(load_vae(source, kind, config, device, dtype), device, dtype)

    @classmethod
    def random(cls, config: VAEConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> "VaeEngine":
        """Deterministic random weights (the random-weight presets; output is noise)."""
        with torch.device("meta"):
            model = WanVAE(config)
        return cls(materialize_random(model, device, dtype, seed), device, dtype)

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """latents [B, z_dim, F', h, w] (normalised) -> video float32 [B, 3, 4(F'-1)+1, 8h, 8w] in [-1, 1]."""
        self._check_latents(latents)
        z = latents.to(self.device, torch.float32) / self.inv_std + self.mean  # as WanPipeline un-normalises
        video = self.model.decode(z.to(self.dtype), progress)
        return video.float().clamp_(-1.0, 1.0)

    def decode(self, latents: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """latents [B, z_dim, F', h, w] (normalised) -> frames uint8 [B, F, H, W, 3] (RGB)."""
        return to_uint8_frames(self.decode_float(latents, progress))

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 4n+1, H, W] in [-1, 1] (H, W multiples of 8) -> normalised posterior mean
        float32 [B, z_dim, n+1, H/8, W/8]."""
        self._check_video(video)
        mean, _ = self.model.encode(video.to(self.device, self.dtype))
        return (mean.float() - self.mean) * self.inv_std

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


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """video [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]: round((x + 1) / 2 * 255), as diffusers."""
    x = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()
