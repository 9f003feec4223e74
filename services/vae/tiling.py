"""Tiled VAE decode (low_mem_level >= 1): overlapping spatial tiles of the latent, each decoded causally on
its own and blended linearly where tiles overlap; peak memory follows the tile size, not the video size.

Each tile runs the whole clip through the decoder with its own temporal feature cache (so only one tile's
cache is alive at a time) and, past the last temporal upsampler, `frames_per_call` video frames per call (4 in
16-bit dtypes and 2 in float32 by default: TilingConfig.for_dtype). Its frames are
weighted by a separable partition of unity (linear ramps across each overlap) and summed; a region of the
output goes to the sink as soon as every tile covering it has been added, so the only float buffers kept
are the overlap strips still waiting for a neighbour.

Tiled is not bit-equal to untiled: a tile's border pixels see zero padding instead of their neighbours and
the decoder's mid-block attention sees only the tile, so the two differ near tile borders (see tests/vae).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from smartdiff.shared.config import VAEConfig

Span = tuple[int, int]


@dataclass(frozen=True)
class TilingConfig:
    """Tile geometry in latent pixels (x8 in the video), and video frames per decoder call past the last temporal
    upsampler. Most of a tile's memory is its causal convolutions' caches (two frames of every conv's input), the
    rest grows with frames_per_call, while one frame per call costs time (small convolutions): see `for_dtype`."""

    tile: int = 48  # largest tile side
    overlap: int = 6  # smallest overlap between neighbouring tiles, blended linearly
    frames_per_call: int = 1  # video frames per decoder call past the last temporal upsampler

    def __post_init__(self) -> None:
        if self.overlap < 1 or 2 * self.tile <= 5 * self.overlap:
            raise ValueError(f"tiling: need 1 <= overlap (tiles are blended across it) and tile > 2.5 x overlap (else "
                             f"the overlaps of a tile's two neighbours can meet inside it, after tile_spans spreads "
                             f"the tiles), got tile {self.tile}, overlap {self.overlap}")
        if self.frames_per_call < 1:
            raise ValueError(f"tiling: frames_per_call must be >= 1, got {self.frames_per_call}")

    @classmethod
    def parse(cls, text: str) -> "TilingConfig":
        """'TILE:OVERLAP' or 'TILE:OVERLAP:FRAMES' (latent px; video frames per call), e.g. '48:6:4'."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"tiling: expected TILE:OVERLAP[:FRAMES] with whole numbers, got {text!r}")
        return cls(*(int(p) for p in parts))

    @classmethod
    def flag(cls, text: str) -> "TilingConfig":
        """parse() as an argparse type: a bad value is a usage error naming the rule."""
        try:
            return cls.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> "TilingConfig":
        """The default tiles for a compute dtype: about 2 GiB peak at any resolution (tile memory does not grow
        with the video), as fast as that allows. 720p x 81 on an H200 (docs/benchmarks.md): 2-byte dtypes
        48:4 with 4 frames per call (2 x 4 tiles, 1.12x the untiled area); float32, twice the bytes per pixel,
        40:4 with 2 frames per call (3 x 5 tiles)."""
        if dtype.itemsize <= 2:
            return cls(tile=48, overlap=4, frames_per_call=4)
        return cls(tile=40, overlap=4, frames_per_call=2)


def tile_spans(length: int, tile: int, overlap: int) -> list[Span]:
    """Cover [0, length) with the fewest equal tiles of at most `tile` overlapping by `overlap` or more.

    Equal sizes give every tile the same shapes (one set of conv algorithms, no allocator churn); starts are
    spread evenly, so a pair's overlap is `overlap` rounded up by at most one pixel. Overlaps never chain:
    a pixel is covered by at most two tiles along an axis.
    """
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)  # <= tile
    starts = [(k * (length - size)) // (count - 1) for k in range(count)]
    if any(b < a + size for a, b in zip(starts, starts[2:])):  # TilingConfig's tile > 2.5 x overlap prevents it
        raise ValueError(f"tiling: tile {tile} with overlap {overlap} over {length} latent px makes three tiles "
                         "overlap; use a tile over 2.5x the overlap")
    return [(s, s + size) for s in starts]


def ramp_weights(spans: list[Span], scale: int, device: torch.device) -> list[torch.Tensor]:
    """Per tile, float32 weights over its `scale`x pixels: linear across each overlap, 1 elsewhere.

    In an overlap of L pixels the left tile has 1 - (j + 0.5) / L and the right one (j + 0.5) / L, so the
    weights of all tiles sum to exactly 1 at every pixel.
    """
    out = []
    for k, (a, b) in enumerate(spans):
        w = torch.ones((b - a) * scale, dtype=torch.float32, device=device)
        if k > 0:
            n = (spans[k - 1][1] - a) * scale
            w[:n] = (torch.arange(n, device=device) + 0.5) / n
        if k + 1 < len(spans):
            n = (b - spans[k + 1][0]) * scale
            w[len(w) - n:] = 1.0 - (torch.arange(n, device=device) + 0.5) / n
        out.append(w)
    return out


class Sink(Protocol):
    def __call__(self, frames: Span, rows: Span, cols: Span, video: torch.Tensor) -> None:
        """Receive final video [B, 3, T, rows, cols] float32 for that frame range and pixel region."""


class _Blender:
    """Adds weighted tiles in raster order and passes on each region once it is complete.

    Pending: the right overlap of the previous tile in the row (all frames) and the bottom overlap of the
    previous row of tiles (full width, all frames). Within a tile a strip is read before it is overwritten.
    """

    def __init__(self, rows: list[Span], cols: list[Span], batch: int, frames: int, sink: Sink,
                 device: torch.device):
        self.rows, self.cols, self.sink = rows, cols, sink
        tile_h = max(b - a for a, b in rows)
        right = max([a1 - b0 for (_, a1), (b0, _) in zip(cols, cols[1:])] or [0])
        below = max([a1 - b0 for (_, a1), (b0, _) in zip(rows, rows[1:])] or [0])
        self.right = torch.zeros(batch, 3, frames, tile_h, right, device=device) if right else None
        self.below = torch.zeros(batch, 3, frames, below, cols[-1][1], device=device) if below else None

    def add(self, r: int, c: int, frames: Span, video: torch.Tensor) -> None:
        """video: tile (r, c)'s weighted frames [B, 3, T, rows, cols] float32 (modified in place)."""
        f0, f1 = frames
        (y0, y1), (x0, x1) = self.rows[r], self.cols[c]
        # Horizontal: complete the left overlap, hold back the right one.
        if c > 0:
            n = self.cols[c - 1][1] - x0
            video[..., :n] += self.right[:, :, f0:f1, :y1 - y0, :n]
        x_end = x1
        if c + 1 < len(self.cols):
            x_end = self.cols[c + 1][0]
            n = x1 - x_end
            self.right[:, :, f0:f1, :y1 - y0, :n] = video[..., x_end - x0:]
            video = video[..., :x_end - x0]
        # Vertical, on the columns now complete across the row: same with the rows above and below.
        if r > 0:
            n = self.rows[r - 1][1] - y0
            video[..., :n, :] += self.below[:, :, f0:f1, :n, x0:x_end]
        y_end = y1
        if r + 1 < len(self.rows):
            y_end = self.rows[r + 1][0]
            n = y1 - y_end
            self.below[:, :, f0:f1, :n, x0:x_end] = video[..., y_end - y0:, :]
            video = video[..., :y_end - y0, :]
        self.sink(frames, (y0, y_end), (x0, x_end), video)


class ChunkDecoder(Protocol):
    """What decode_tiled needs of the VAE (WanVAE is one): its strides and a causal chunked decode."""

    config: VAEConfig

    def decode_chunks(self, z: torch.Tensor, frames_per_call: int | None = None,
                      progress: Callable[[int, int], None] | None = None
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first video frame index, frames [B, 3, T, 8h, 8w]) in order."""


def decode_tiled(model: ChunkDecoder, z: torch.Tensor, config: TilingConfig, sink: Sink,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Decode latents z [B, C, F', h, w] (un-normalised, in the model's dtype) tile by tile into `sink`, which
    receives regions of the [B, 3, F, 8h, 8w] video. progress(i, n) counts latent frames over all tiles."""
    b, _, f_lat, h, w = z.shape
    st, sh, sw = model.config.stride
    rows, cols = tile_spans(h, config.tile, config.overlap), tile_spans(w, config.tile, config.overlap)
    wy, wx = ramp_weights(rows, sh, z.device), ramp_weights(cols, sw, z.device)
    blender = _Blender([(a * sh, e * sh) for a, e in rows], [(a * sw, e * sw) for a, e in cols],
                       b, st * (f_lat - 1) + 1, sink, z.device)
    total = len(rows) * len(cols) * f_lat
    for r, (r0, r1) in enumerate(rows):
        for c, (c0, c1) in enumerate(cols):
            weight = wy[r][:, None] * wx[c][None, :]  # [tile rows, tile cols] px
            done = (r * len(cols) + c) * f_lat
            tile_progress = None if progress is None else (lambda i, n, done=done: progress(done + i, total))
            for start, video in model.decode_chunks(z[:, :, :, r0:r1, c0:c1], config.frames_per_call,
                                                    tile_progress):
                video = video.float().clamp_(-1.0, 1.0).mul_(weight)
                blender.add(r, c, (start, start + video.shape[2]), video)
                del video


class FloatSink:
    """Collects the video as float32 [B, 3, F, H, W] in [-1, 1] on `device`."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.video = torch.empty(shape, dtype=torch.float32, device=device)

    def __call__(self, frames: Span, rows: Span, cols: Span, video: torch.Tensor) -> None:
        self.video[:, :, frames[0]:frames[1], rows[0]:rows[1], cols[0]:cols[1]] = video


class NonFiniteVideo(ValueError):
    """The decoder's output holds NaN or infinity (latents far outside the trained range overflow in the decoder,
    sooner in float16 or bfloat16); as uint8 frames it would be a black video."""


NON_FINITE = ("decoded to non-finite values (overflow in the decoder: the latents are far outside the range the "
              "model produces)")


def check_finite(video: torch.Tensor) -> None:
    """NonFiniteVideo unless every value of the decoded video (or region) is finite."""
    if not torch.isfinite(video).all():
        raise NonFiniteVideo(NON_FINITE)


class Uint8Sink:
    """Quantises regions as `to_uint8_frames` does into frames uint8 [B, F, H, W, 3] on `out_device`.

    Regions come one tile rectangle at a time (all its frames, then the next rectangle): each rectangle is
    assembled on the compute device and copied out once, so with a CPU `out_device` the video itself never
    occupies device memory. Call `result()` at the end.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device,
                 out_device: torch.device | str | None = None):
        b, _, f, h, w = shape
        self.device = torch.device(device)
        out_device = self.device if out_device is None else torch.device(out_device)
        self.frames = torch.empty(b, f, h, w, 3, dtype=torch.uint8, device=out_device)
        self._rect: tuple[Span, Span] | None = None
        self._stage: torch.Tensor | None = None

    def __call__(self, frames: Span, rows: Span, cols: Span, video: torch.Tensor) -> None:
        if (rows, cols) != self._rect:
            self._flush()
            self._rect = (rows, cols)
            region = self.frames[:, :, rows[0]:rows[1], cols[0]:cols[1]]
            self._stage = region if region.device == self.device else torch.empty(
                region.shape, dtype=torch.uint8, device=self.device)
        check_finite(video)
        q = video.add_(1.0).div_(2.0).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        self._stage[:, frames[0]:frames[1]] = q.permute(0, 2, 3, 4, 1)

    def _flush(self) -> None:
        if self._rect is not None and self._stage.device != self.frames.device:
            (y0, y1), (x0, x1) = self._rect
            self.frames[:, :, y0:y1, x0:x1] = self._stage.to(self.frames.device)
        self._rect, self._stage = None, None

    def result(self) -> torch.Tensor:
        self._flush()
        return self.frames
