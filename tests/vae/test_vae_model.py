"""Wan VAE: ours vs diffusers' AutoencoderKLWan with the same weights; loading both checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from smartdiff.services.vae.engine import VaeEngine
from smartdiff.services.vae.model import WanVAE
from smartdiff.services.vae.weights import convert_diffusers_state_dict, load_vae
from smartdiff.shared.model_source import vae_config_from_json
from smartdiff.shared.checkpoint import WAN_VAE_FILE, CheckpointError, load_strict
from smartdiff.shared.config import load_model_config

CFG = load_model_config("wan-tiny").vae
MEAN = torch.tensor(CFG.latents_mean).view(1, -1, 1, 1, 1)
STD = torch.tensor(CFG.latents_std).view(1, -1, 1, 1, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=CFG.base_dim, z_dim=CFG.z_dim, num_res_blocks=CFG.num_res_blocks).eval()


@pytest.fixture(scope="module")
def engine(reference) -> VaeEngine:
    with torch.device("meta"):
        model = WanVAE(CFG)
    sd = convert_diffusers_state_dict(reference.state_dict(), CFG.num_res_blocks)
    return VaeEngine(load_strict(model, sd, "diffusers reference", "cpu", torch.float32))


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, CFG.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference_video(reference, latents) -> torch.Tensor:
    with torch.no_grad():  # WanPipeline: latents / (1 / std) + mean, then decode (clamped to [-1, 1])
        return reference.decode(latents / (1.0 / STD) + MEAN).sample


def test_decode_matches_diffusers(engine, latents, reference_video):
    ours = engine.decode_float(latents)
    assert ours.shape == (1, 3, 9, 32, 32)  # F = 4 (F' - 1) + 1, H = 8h
    assert ours.abs().max() <= 1.0
    assert rel_err(ours, reference_video) <= 1e-4


def test_uint8_frames_match_diffusers_postprocessing(engine, latents, reference_video):
    frames = engine.decode(latents)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 9, 32, 32, 3)
    theirs = VideoProcessor().postprocess_video(reference_video, output_type="pt")  # [B, F, 3, H, W], [0, 1]
    theirs = (theirs * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    diff = (frames.int() - theirs.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # only float ties at .5 may flip


def test_encode_matches_diffusers_posterior_mean(engine, reference):
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = engine.encode(video)
    with torch.no_grad():
        theirs = (reference.encode(video).latent_dist.mean - MEAN) * (1.0 / STD)
    assert ours.shape == (1, CFG.z_dim, 3, 4, 4)
    assert rel_err(ours, theirs) <= 1e-4


def test_batch_equals_one_by_one_and_reports_progress(engine):
    z = torch.randn(2, CFG.z_dim, 2, 2, 3, generator=torch.Generator().manual_seed(3))
    calls = []
    both = engine.decode_float(z, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 2), (2, 2)]
    assert both.shape == (2, 3, 5, 16, 24)
    for b in range(2):
        torch.testing.assert_close(both[b:b + 1], engine.decode_float(z[b:b + 1]), rtol=0, atol=1e-5)


def test_bad_inputs_are_refused(engine):
    with pytest.raises(ValueError, match="latents"):
        engine.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="4n \\+ 1"):
        engine.encode(torch.zeros(1, 3, 4, 16, 16))


def test_builds_on_meta_with_the_official_parameter_count(reference):
    with torch.device("meta"):
        model = WanVAE(CFG)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    keys = model.state_dict().keys()
    assert {"encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.head.2.weight"} <= keys


def test_config_from_diffusers_json(reference):
    assert vae_config_from_json(dict(reference.config), "config.json") == CFG


def _save_both_layouts(reference, engine, root):
    reference.save_pretrained(root / "vae")
    torch.save(engine.model.state_dict(), root / WAN_VAE_FILE)


def test_official_and_diffusers_layouts_load_the_same_model(reference, engine, latents, tmp_path):
    _save_both_layouts(reference, engine, tmp_path)
    official = load_vae(tmp_path / WAN_VAE_FILE, "wan", CFG)
    diffusers_layout = load_vae(tmp_path / "vae", "diffusers", CFG)
    a, b = official.state_dict(), diffusers_layout.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from_folder = VaeEngine.from_checkpoint(tmp_path, "wan", CFG)
    assert torch.equal(from_folder.decode_float(latents), engine.decode_float(latents))


def test_diffusers_config_mismatch_names_the_field(reference, tmp_path):
    reference.save_pretrained(tmp_path / "vae")
    config_path = tmp_path / "vae" / "config.json"
    data = json.loads(config_path.read_text())
    data["num_res_blocks"] = 2
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="num_res_blocks is 2"):
        load_vae(tmp_path / "vae", "diffusers", CFG)
    data["is_residual"] = True  # a Wan2.2-TI2V feature: refused, naming the file
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        load_vae(tmp_path / "vae", "diffusers", CFG)
    assert str(config_path) in str(err.value) and "is_residual=True is not supported" in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "wrong_shape"])
def test_broken_checkpoint_names_file_and_key_and_loads_nothing(engine, tmp_path, damage):
    sd = dict(engine.model.state_dict())
    key = "decoder.upsamples.2.resample.1.weight"
    if damage == "missing":
        del sd[key]
    else:
        sd[key] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / WAN_VAE_FILE
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_vae(path, "wan", CFG)
    assert str(path) in str(err.value) and key in str(err.value)
    with torch.device("meta"):
        model = WanVAE(CFG)
    with pytest.raises(CheckpointError):
        load_strict(model, sd, path, "cpu", torch.float32)
    assert all(t.is_meta for t in model.state_dict().values())  # all-or-nothing


def test_random_preset_is_deterministic(latents):
    a = VaeEngine.random(CFG, seed=0).decode(latents)
    b = VaeEngine.random(CFG, seed=0).decode(latents)
    assert torch.equal(a, b) and a.shape == (1, 9, 32, 32, 3)


def test_channels_last_gives_the_same_video_and_every_convolution_reads_channels_last(reference, latents,
                                                                                     reference_video, cudnn_layouts):
    """use_channels_last (the engine's layout on CUDA): same numbers as diffusers, and every convolution of the
    decoder and encoder reads a dense channels-last input (padded buffers included), so cuDNN converts no layout
    around any of them. The tiny preset has every layer type: residual blocks, the mid attention, 2D and 3D
    upsamplers and downsamplers, the causal cache."""
    with torch.device("meta"):
        model = WanVAE(CFG)
    sd = convert_diffusers_state_dict(reference.state_dict(), CFG.num_res_blocks)
    engine = VaeEngine(load_strict(model, sd, "diffusers reference", "cpu", torch.float32).use_channels_last())
    video = engine.decode_float(latents)
    assert rel_err(video, reference_video) <= 1e-4 and video.is_contiguous()  # the public result stays NCDHW
    mean = engine.encode(torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    assert mean.shape == (1, CFG.z_dim, 2, 4, 4) and mean.isfinite().all()
    assert len(cudnn_layouts) > 100 and set(cudnn_layouts) == {"channels_last", "nhwc"}, sorted(set(cudnn_layouts))
    engine.model.use_channels_last(False)
    assert rel_err(engine.decode_float(latents), video) <= 1e-5


@pytest.mark.parametrize("batch, frames_per_call, tiled", [(2, None, False), (1, 1, False), (2, 2, False),
                                                           (1, None, True)])
def test_channels_last_batches_frame_splits_and_tiles(engine, batch, frames_per_call, tiled, cudnn_layouts):
    """The paths where the decoder sees views rather than dense tensors (a batch's frame, a split of a call's
    frames, a tile) stay channels-last too, and give the NCDHW numbers."""
    from smartdiff.services.vae.tiling import TilingConfig

    z = torch.randn(batch, CFG.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    model = engine.model
    decode = (lambda: VaeEngine(model, tiling=TilingConfig(3, 1, 1)).decode_float(z)) if tiled else (
        lambda: torch.cat([v for _, v in model.decode_chunks(z, frames_per_call)], dim=2))
    want = decode()
    try:
        model.use_channels_last()
        cudnn_layouts.clear()
        got = decode()
    finally:
        model.use_channels_last(False)
    assert rel_err(got, want) <= 1e-5
    assert set(cudnn_layouts) == {"channels_last", "nhwc"}, sorted(set(cudnn_layouts))


def test_use_channels_last_converts_every_convolution_weight_and_back():
    model = WanVAE(CFG).use_channels_last()
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))]
    assert model.channels_last and len(convs) > 50
    fmt = {5: torch.channels_last_3d, 4: torch.channels_last}
    assert all(m.weight.is_contiguous(memory_format=fmt[m.weight.dim()]) for m in convs)
    assert all(m.weight.stride(1) == 1 for m in convs if m.weight.shape[2:].numel() > 1)  # not merely ambiguous
    model.use_channels_last(False)
    assert not model.channels_last and all(m.weight.is_contiguous() for m in convs)


def test_the_engine_keeps_ncdhw_on_the_cpu():
    assert not VaeEngine.random(CFG, "cpu").model.channels_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_engine_uses_channels_last_on_cuda():
    engine = VaeEngine.random(CFG, "cuda")
    assert engine.model.channels_last
    assert engine.model.decoder.head[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    video = engine.decode_float(torch.randn(1, CFG.z_dim, 2, 4, 4, device="cuda"))
    assert video.is_contiguous()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_decode_in_pieces_equals_decode_and_stops_at_a_nan_piece(device):
    from smartdiff.services.vae.tiling import NonFiniteVideo

    engine = VaeEngine.random(CFG, device)
    z = torch.randn(1, CFG.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(0)).to(device)
    pieces = list(engine.decode_pieces(z))
    assert [p.shape[1] for p in pieces] == [1, 4, 4] and all(p.device.type == "cpu" for p in pieces)
    assert torch.equal(torch.cat(pieces, 1), engine.decode(z).cpu())
    z[:, :, 2] = 1e38  # the third latent frame overflows: the first two pieces come, then the error
    stream = engine.decode_pieces(z)
    assert torch.equal(next(stream), pieces[0]) and torch.equal(next(stream), pieces[1])
    with pytest.raises(NonFiniteVideo):
        next(stream)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_upsampling_in_bfloat16_equals_the_float32_round_trip_and_keeps_the_layout(fmt):
    """Upsample2x runs in the activation's dtype: nearest upsampling only copies values, so it must equal the
    float32 round trip diffusers takes, bit for bit, in either layout."""
    from smartdiff.services.vae.model import Upsample2x

    x = torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(0)).bfloat16().contiguous(memory_format=fmt)
    got = Upsample2x()(x)
    want = torch.nn.functional.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 14, 18)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=fmt)
