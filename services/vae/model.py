"""Wan2.1 causal video VAE (encoder + decoder); parameter names follow the official `Wan2.1_VAE.pth` keys.

Shapes: video [B, 3, F, H, W] in [-1, 1] with F = 4n + 1  <->  latents [B, z_dim, n + 1, H/8, W/8].
Time is processed causally in chunks (encode: 1 frame, then 4 at a time; decode: 1 latent frame at a
time). A `FeatureCache` carries, for every temporal convolution, the last input frames of the previous
chunk, so chunked processing equals one causal pass over the whole clip while memory stays per-chunk.

Every layer works in either memory layout, NCDHW or channels-last (NDHWC), and keeps its input's: with the
convolution weights in channels-last (`WanVAE.use_channels_last`, what the VAE engine does on CUDA) the
activations are channels-last from the first convolution on, which is the layout cuDNN's convolution kernels
read, so no layout conversion runs around each convolution.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from smartdiff.shared.config import VAEConfig

from . import fused


def dense_layout(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format x [B, C, T, H, W] is dense in: NCDHW (contiguous) or channels-last 3D; None if neither."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The layout family of x [B, C, T, H, W], dense or a view (a frame, a padded buffer's interior): channels-last
    3D when its channels are the unit-stride dim, else NCDHW."""
    cl = x.dim() == 5 and x.shape[1] > 1 and x.stride(1) == 1
    return torch.channels_last_3d if cl else torch.contiguous_format


def empty_like_layout(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised tensor of `shape` with x's dtype, device and layout family (layout_of)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x))


def cat_frames(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of [B, C, T_i, H, W] along time into a buffer of the last part's layout family (torch.cat picks
    NCDHW when the parts are views or mixed)."""
    last = parts[-1]
    out = empty_like_layout(last, *last.shape[:2], sum(p.shape[2] for p in parts), *last.shape[3:])
    start = 0
    for p in parts:
        out[:, :, start:start + p.shape[2]] = p
        start += p.shape[2]
    return out


def per_frame(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, H, W] as frames [B * T, C, H, W] in x's layout family: a view when x is dense, with canonical
    channels-last strides for a channels-last x (PyTorch's layout checks look at the strides of size-1 dims too,
    and odd ones make the next op copy to NCHW); a channels-last view that is not dense (a frame of a batch) is
    copied into one that is."""
    b, c, t, h, w = x.shape
    if layout_of(x) is torch.channels_last_3d:
        x = x.contiguous(memory_format=torch.channels_last_3d)  # no copy when already dense
        return x.as_strided((b * t, c, h, w), (h * w * c, 1, w * c, c))
    return x.transpose(1, 2).flatten(0, 1)


class FeatureCache:
    """State carried between the chunks of one encode or decode call.

    frames[module]: the last input frames a causal conv (or a temporal down-sampler) saw, prepended to
    its next chunk in place of zero padding. seen: temporal up-samplers past their first chunk.
    """

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.seen: set[nn.Module] = set()


class CausalConv3d(nn.Conv3d):
    """3D convolution padded only towards the past in time (and symmetrically in space).

    With a cache, the previous chunk's last frames replace the leading zero padding.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt  # all of it in front: output frame t sees input frames <= t
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C_out, T', H', W']."""
        if cache is None or self.time_pad == 0:
            return super().forward(self._padded(x, None))
        prev = cache.frames.get(self)
        cache.frames[self] = self._last_frames(prev, x)
        x = self._padded(x, prev)
        del prev  # the cache now holds the frames the next chunk needs
        return super().forward(x)

    def _last_frames(self, prev: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The last time_pad frames of [prev; x] (fewer at the start of the clip), copied."""
        need = self.time_pad - x.shape[2]
        if need <= 0 or prev is None:
            return x[:, :, -self.time_pad:].clone()
        return cat_frames([prev[:, :, -need:], x])

    def _padded(self, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """[zeros; prev; x] in time (time_pad frames before x) with the spatial zero border, in one buffer."""
        if self.time_pad == 0 and not any(self.space_pad):
            return x
        out, slot = self.padded_buffer(x, prev)
        slot.copy_(x)
        return out

    def padded_buffer(self, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this conv's padded input for an input shaped as x, with its padding set: zeros, or `prev`'s frames
        last in the time padding; the view of it where x's values go, left unset for the caller to fill)."""
        pw0, pw1, ph0, ph1 = self.space_pad
        b, c, t, h, w = x.shape
        tp = self.time_pad
        out = empty_like_layout(x, b, c, tp + t, h + ph0 + ph1, w + pw0 + pw1)
        out[:, :, :, :ph0] = 0  # spatial borders (empty slices where there is none)
        out[:, :, :, ph0 + h:] = 0
        out[..., :pw0] = 0
        out[..., pw0 + w:] = 0
        inner = out[:, :, :, ph0:ph0 + h, pw0:pw0 + w]
        kept = prev.shape[2] if prev is not None else 0
        inner[:, :, :tp - kept] = 0
        if prev is not None:
            inner[:, :, tp - kept:tp] = prev
        return out, inner[:, :, tp:]


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a learned gain; no bias."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T, H, W] (video) or [N, C, H, W]; low precision is normalised in float32."""
        y = F.normalize(x.float(), dim=1).to(x.dtype)
        if y.dtype != torch.promote_types(y.dtype, self.gamma.dtype) or torch.is_grad_enabled():
            return y * self.scale * self.gamma
        return y.mul_(self.scale).mul_(self.gamma)  # same arithmetic in place: one full-size tensor less


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x spatial upsampling of [N, C, H, W] in x's dtype and layout.

    Each output pixel is a copy of one input pixel, so this equals the float32 round trip the reference takes
    (diffusers upsamples bf16 in float32), without its two conversion passes over the largest activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Halve or double H and W (per frame); the "3d" modes also halve or double time.

    upsample*: [B, C, T, H, W] -> [B, C/2, T or 2T, 2H, 2W] (the first chunk never doubles: frame 0
    is the clip's lone first frame). downsample*: [B, C, T, H, W] -> [B, C, T', H/2, W/2] with
    T' = T on the first chunk, else (T + 1 - 3) // 2 + 1 using the previous chunk's last frame.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right/bottom only, then a strided 3x3 conv
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        x = self._per_frame(x)
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _per_frame(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t = x.shape[:3]
        if t > 1 and self.mode.startswith("upsample"):
            # One frame at a time: the 2x-upsampled conv input is the largest tensor of a decoder step.
            first = self._per_frame(x[:, :, :1])
            out = empty_like_layout(first, b, first.shape[1], t, *first.shape[3:])
            out[:, :, :1] = first
            for i in range(1, t):
                out[:, :, i:i + 1] = self._per_frame(x[:, :, i:i + 1])
            return out
        y = self.resample(per_frame(x))  # [B*T, C', H', W']
        return y.unflatten(0, (b, t)).transpose(1, 2)

    def _double_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self not in cache.seen:  # first chunk: its time_conv history starts at the next chunk
            cache.seen.add(self)
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache).view(b, 2, c, t, h, w)  # two output frames per input frame
        out = empty_like_layout(x, b, c, 2 * t, h, w)  # frames interleaved: (t, 0), (t, 1), in x's layout
        out.unflatten(2, (t, 2)).copy_(y.permute(0, 2, 3, 1, 4, 5))
        return out

    def _halve_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        prev = cache.frames.get(self)
        cache.frames[self] = x[:, :, -1:].clone()
        if prev is None:  # first chunk (one frame) passes through
            return x
        return self.time_conv(cat_frames([prev, x]))


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, CausalConv3d) x 2 plus a 1x1x1 shortcut: [B, in, T, H, W] -> [B, out, T, H, W]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices match the checkpoint: residual.{0,2,3,6}; 5 was a (p=0) dropout.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(inplace=True), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # SiLU in place: its input is always the fresh RMSNorm output
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if fused.applies(x):  # the same two norm -> SiLU -> conv steps, each norm + SiLU as one kernel
            h = fused.norm_silu_conv(self.residual[0], self.residual[2], x, cache)
            return fused.norm_silu_conv(self.residual[3], self.residual[6], h, cache).add_(self.shortcut(x))
        return _run(self.residual, x, cache).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T, H, W] -> same shape."""
        b, c, t, h, w = x.shape
        y = self.norm(per_frame(x))  # [B*T, C, H, W]
        qkv = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1)  # [B*T, 1, H*W, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.unflatten(0, (b, t)).transpose(1, 2)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _run(layers: nn.Sequential, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    """Apply layers in order, handing the cache to those with temporal state."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, Resample, ResidualBlock)) else layer(x)
    return x


class Encoder3d(nn.Module):
    """Video chunk [B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] (T' = 1 for the first chunk, else T/4)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder3d(nn.Module):
    """Latent chunk [B, z_dim, T, h, w] -> [B, 3, T_out, 8h, 8w] (T_out = 1 for the first chunk, else 4T)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous level's upsampler halved the channels
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)
        # Past the last temporal upsampler every layer is causal-cached or per-frame, so that high-resolution
        # part may run on any split of the chunk's frames (one at a time bounds its activations).
        ups = [i for i, b in enumerate(blocks) if isinstance(b, Resample) and b.mode == "upsample3d"]
        self.time_split = ups[-1] + 1 if ups else 0

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return self.forward_high(self.forward_low(x, cache), cache)

    def forward_low(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """Latent chunk -> features after the last temporal upsampler (all of the chunk's output frames)."""
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.upsamples[:self.time_split], x, cache)

    def forward_high(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """`forward_low` features of some consecutive output frames -> those RGB frames [B, 3, T, 8h, 8w]."""
        x = _run(self.upsamples[self.time_split:], x, cache)
        if fused.applies(x):
            return fused.norm_silu_conv(self.head[0], self.head[2], x, cache)
        return _run(self.head, x, cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE on raw (un-normalised) latents; normalisation lives in the engine.

    `conv1` maps encoder features to (mean, log-variance); `conv2` is the decoder's 1x1x1 input conv.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.channels_last = False  # the convolution weights' layout (use_channels_last)

    def use_channels_last(self, on: bool = True) -> "WanVAE":
        """Convolution weights in channels-last memory format (NDHWC, NHWC), or back to NCDHW with on=False: same
        values; channels-last activations then follow from the first convolution on (see the module docstring).
        Returns self."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                m.weight.data = m.weight.data.contiguous(memory_format=fmt if on else torch.contiguous_format)
        self.channels_last = on
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """An input in the weights' layout (the convolutions keep it from there)."""
        return x.contiguous(memory_format=torch.channels_last_3d if self.channels_last else torch.contiguous_format)

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, 3, 1 + 4n, H, W] -> posterior (mean, log_var), each [B, z_dim, 1 + n, H/8, W/8]."""
        if (video.shape[2] - 1) % 4:
            raise ValueError(f"encode needs 4n + 1 frames, got {video.shape[2]}")
        cache = FeatureCache()
        chunks = [video[:, :, :1]] + list(video[:, :, 1:].split(4, dim=2))
        out = cat_frames([self.encoder(self._layout(chunk), cache) for chunk in chunks])
        mean, log_var = self.conv1(out).chunk(2, dim=1)
        return mean, log_var

    def decode(self, z: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """z [B, z_dim, F', h, w] -> video [B, 3, 4(F'-1)+1, 8h, 8w], unclamped.

        One latent frame per step; `progress(i, F')` is called after frame i (1-based) is decoded.
        """
        return cat_frames([video for _, video in self.decode_chunks(z, progress=progress)])

    def decode_chunks(self, z: torch.Tensor, frames_per_call: int | None = None,
                      progress: Callable[[int, int], None] | None = None
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """Causal decode yielding (first video frame index, video [B, 3, T, 8h, 8w]) as frames come out.

        One latent frame per decoder call; `frames_per_call` (None: all 4) splits each call's high-resolution
        part into runs of that many video frames, which lowers peak memory and gives the same video.
        """
        cache = FeatureCache()
        x = self.conv2(self._layout(z))
        start = 0
        for i in range(z.shape[2]):
            features = self.decoder.forward_low(x[:, :, i:i + 1], cache)
            parts = features.split(frames_per_call, dim=2) if frames_per_call else (features,)
            del features
            for part in parts:
                video = self.decoder.forward_high(part, cache)
                yield start, video
                start += video.shape[2]
            del parts
            if progress is not None:
                progress(i + 1, z.shape[2])
