"""Tiled VAE decode (low_mem_level >= 1) against the untiled decode.

Stated tolerance: the blending is exact (a decoder that is local in space gives the untiled video to float32
rounding, 1e-6), and so is the chunked causal decode (one tile covering the latent: bit-equal). With the real
decoder, tiling differs from untiled only near the seams: a tile's border pixels see zero padding instead of
their neighbours, and that reaches as far as the decoder's receptive field (about 12 latent pixels for this
tiny config, ~17 for Wan's). Outside that band the videos agree to 1e-5 (conv rounding); inside it they differ
by up to ~0.3 here, on random weights. The decoder's mid-block attention is global per frame, so with it
left on the difference spreads everywhere (relative error ~0.1 on random weights, whose attention is
diffuse; trained weights attend locally, which is why tiling is usable at all): bounded, not exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smartdiff.services.vae.engine import VaeEngine, to_uint8_frames
from smartdiff.services.vae.model import AttentionBlock
from smartdiff.services.vae.tiling import (
    FloatSink, NonFiniteVideo, TilingConfig, decode_tiled, ramp_weights, tile_spans,
)
from smartdiff.shared.config import VAEConfig, load_model_config
from smartdiff.shared.memory import MemoryPolicyError

CFG = load_model_config("wan-tiny").vae


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def engine() -> VaeEngine:
    return VaeEngine.random(CFG, seed=0)


@pytest.fixture(scope="module")
def local_engine() -> VaeEngine:
    """The tiny VAE with its mid-block attention switched off (proj = 0), so every output pixel has a bounded
    receptive field."""
    eng = VaeEngine.random(CFG, seed=0)
    for m in eng.model.decoder.modules():
        if isinstance(m, AttentionBlock):
            m.proj.weight.data.zero_()
            m.proj.bias.data.zero_()
    return eng


@pytest.mark.parametrize("length,tile,overlap", [
    (90, 48, 6), (160, 48, 6), (60, 48, 6), (104, 48, 6), (41, 16, 4), (17, 16, 4), (16, 16, 4), (7, 48, 6),
    (200, 33, 10)])
def test_tile_spans_cover_with_equal_tiles_and_two_deep_overlaps(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    sizes = {b - a for a, b in spans}
    assert len(sizes) == 1 and max(sizes) <= tile
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a0 < b0 and a1 - b0 >= overlap  # neighbours overlap by at least `overlap`
    for (_, a1), (c0, _) in zip(spans, spans[2:]):
        assert c0 >= a1  # never three tiles on one pixel along an axis


@pytest.mark.parametrize("dtype, grid, tile_px, area", [
    (torch.bfloat16, (2, 4), (47, 43), 1.123),  # 8 tiles of 376 x 344 video px, 4 frames per call
    (torch.float32, (3, 5), (33, 36), 1.2375),  # 15 tiles of 264 x 288 video px, 2 frames per call
])
def test_default_tiles_720p(dtype, grid, tile_px, area):
    cfg = TilingConfig.for_dtype(dtype)
    rows, cols = tile_spans(90, cfg.tile, cfg.overlap), tile_spans(160, cfg.tile, cfg.overlap)
    assert (len(rows), len(cols)) == grid
    assert (rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]) == tile_px
    assert sum(b - a for a, b in rows) * sum(b - a for a, b in cols) / (90 * 160) == pytest.approx(area, abs=1e-3)


def test_ramp_weights_are_a_partition_of_unity():
    spans = tile_spans(41, 16, 4)
    total = torch.zeros(41 * 8)
    for (a, b), w in zip(spans, ramp_weights(spans, 8, torch.device("cpu"))):
        assert w.min() > 0 and w.max() == 1.0
        total[a * 8:b * 8] += w
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


class LocalDecoder:
    """A causal 'VAE' whose output pixels depend only on the latent pixel above them: tiling must be exact."""

    config = VAEConfig()

    def __init__(self) -> None:
        self.mix = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) / 4

    def decode_chunks(self, z, frames_per_call=None, progress=None):
        start = 0
        for i in range(z.shape[2]):
            rgb = torch.einsum("oc,bcthw->bothw", self.mix, z[:, :, i:i + 1]).tanh()
            frames = 1 if i == 0 else 4
            video = F.interpolate(rgb.repeat(1, 1, frames, 1, 1), scale_factor=(1, 8, 8), mode="nearest")
            video = video + 0.01 * torch.arange(frames).view(1, 1, -1, 1, 1)  # distinct frames within a chunk
            yield start, video
            start += frames
            if progress:
                progress(i + 1, z.shape[2])


def test_blending_is_exact_for_a_spatially_local_decoder():
    dec = LocalDecoder()
    z = torch.randn(2, 16, 3, 41, 50, generator=torch.Generator().manual_seed(1))
    tiling = TilingConfig(tile=16, overlap=4)
    n = len(tile_spans(41, 16, 4)) * len(tile_spans(50, 16, 4))
    assert n == 16
    untiled = torch.cat([v for _, v in dec.decode_chunks(z)], dim=2).clamp(-1, 1)
    sink = FloatSink(tuple(untiled.shape), torch.device("cpu"))
    sink.video.fill_(float("nan"))  # every pixel must be written
    calls = []
    decode_tiled(dec, z, tiling, sink, progress=lambda i, total: calls.append((i, total)))
    assert not sink.video.isnan().any()
    torch.testing.assert_close(sink.video, untiled, atol=1e-6, rtol=0)
    assert calls == [(i, n * 3) for i in range(1, n * 3 + 1)]  # latent frames over all tiles, in order


@pytest.mark.parametrize("frames_per_call", [1, 2, 4])
def test_one_tile_equals_untiled_bit_for_bit(engine, frames_per_call):
    z = torch.randn(1, CFG.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    tiled = VaeEngine(engine.model, tiling=TilingConfig(tile=16, overlap=4, frames_per_call=frames_per_call))
    assert torch.equal(tiled.decode_float(z), engine.decode_float(z))  # splitting a call's frames is exact too


def test_tiled_equals_untiled_away_from_the_seam(local_engine):
    z = torch.randn(1, CFG.z_dim, 2, 4, 40, generator=torch.Generator().manual_seed(3))
    tiling = TilingConfig(tile=24, overlap=8)
    assert tile_spans(40, tiling.tile, tiling.overlap) == [(0, 24), (16, 40)]
    ref = local_engine.decode_float(z)
    out = VaeEngine(local_engine.model, tiling=tiling).decode_float(z)
    err = (out - ref).abs().amax(dim=(0, 1, 2, 3))  # per video column
    seam = slice(8 * 8, 32 * 8)  # the overlap [16, 24) +- the ~12 latent px receptive field
    assert err[:seam.start].max() <= 1e-5 and err[seam.stop:].max() <= 1e-5
    assert err[seam].max() <= 0.5  # zero padding seen at the tile borders, blended across the overlap
    assert rel_err(out, ref) <= 0.05


def test_tiled_with_global_attention_is_bounded(engine):
    z = torch.randn(1, CFG.z_dim, 2, 8, 24, generator=torch.Generator().manual_seed(4))
    ref = engine.decode_float(z)
    out = VaeEngine(engine.model, tiling=TilingConfig(tile=16, overlap=6)).decode_float(z)
    assert out.shape == ref.shape and out.abs().max() <= 1.0
    assert rel_err(out, ref) <= 0.2  # random weights: diffuse attention over the whole frame (see module doc)


def test_level_1_decodes_tiles_to_uint8_frames_on_the_cpu(engine):
    z = torch.randn(1, CFG.z_dim, 2, 8, 24, generator=torch.Generator().manual_seed(5))
    level1 = VaeEngine(engine.model, low_mem_level=1, tiling=TilingConfig(tile=16, overlap=6))
    frames = level1.decode(z)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 5, 64, 192, 3) and frames.device.type == "cpu"
    assert torch.equal(frames, to_uint8_frames(level1.decode_float(z)))  # same quantisation as untiled


def test_latents_that_decode_to_nan_are_an_error_not_a_black_video(engine):
    """Finite latents far outside the trained range overflow in the decoder; both paths refuse the NaN video."""
    z = torch.full((1, CFG.z_dim, 1, 8, 24), 1e38)
    level1 = VaeEngine(engine.model, low_mem_level=1, tiling=TilingConfig(tile=16, overlap=6))
    for e in (engine, level1):
        with pytest.raises(NonFiniteVideo, match="decoded to non-finite values"):
            e.decode(z)


def test_levels_pick_tiling(engine):
    assert VaeEngine(engine.model, low_mem_level=0).tiling is None
    assert VaeEngine(engine.model, low_mem_level=1).tiling == TilingConfig.for_dtype(torch.float32)
    assert VaeEngine(engine.model, low_mem_level=3).tiling == TilingConfig.for_dtype(torch.float32)  # levels nest
    with pytest.raises(MemoryPolicyError, match="low_mem_level"):
        VaeEngine(engine.model, low_mem_level=4)


def test_encode_still_works_with_the_encoder_parked(engine):
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    level1 = VaeEngine(engine.model, low_mem_level=1)
    torch.testing.assert_close(level1.encode(video), engine.encode(video), atol=0, rtol=0)


@pytest.mark.parametrize("kw", [dict(tile=8, overlap=4), dict(overlap=-1), dict(overlap=0), dict(frames_per_call=0)])
def test_bad_tiling_is_refused(kw):
    with pytest.raises(ValueError, match="tiling"):
        TilingConfig(**kw)


@pytest.mark.parametrize("tile,overlap,length", [(48, 22, 104), (17, 8, 30), (5, 2, 9)])
def test_tiles_whose_neighbours_overlaps_could_meet_are_refused(tile, overlap, length):
    """tile_spans spreads equal tiles, rounding overlaps up: at tile <= 2.5 x overlap three tiles can cover one
    pixel (--tiling 48:22 over 104 latent columns: weights summing to 1.13, a bright stripe), which the blend
    does not handle."""
    with pytest.raises(ValueError, match="tile > 2.5 x overlap"):
        TilingConfig(tile=tile, overlap=overlap)
    with pytest.raises(ValueError, match="three tiles"):
        tile_spans(length, tile, overlap)


def test_every_allowed_tiling_covers_each_pixel_with_weights_summing_to_one():
    for tile in range(3, 41):
        for overlap in range(1, tile):
            if 2 * tile <= 5 * overlap:
                continue
            for length in range(1, 120):
                spans = tile_spans(length, tile, overlap)
                total = torch.zeros(length)
                for (a, b), w in zip(spans, ramp_weights(spans, 1, torch.device("cpu"))):
                    total[a:b] += w
                assert torch.allclose(total, torch.ones(length)), (tile, overlap, length, spans)
