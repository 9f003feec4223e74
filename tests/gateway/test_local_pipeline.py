"""The whole in-process pipeline against diffusers' WanPipeline: same folder, same seed -> same final latents."""

import pytest
import torch

from smartdiff.services.gateway.local import LocalPipeline
from smartdiff.shared.model_source import resolve_model
from smartdiff.shared.request import GenerationRequest, resolve_request

diffusers = pytest.importorskip("diffusers")

PROMPT = "A  cat &amp; a dog walking on grass at sunset"
NEGATIVE = "blurry, static"


def ours(folder, model=None, **kw):
    cfg, layout = resolve_model(model, folder)
    req = resolve_request(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, **kw), cfg)
    pipe = LocalPipeline.load(cfg, layout, torch.device("cpu"), torch.float32)
    return pipe, pipe.generate(req)


def reference(folder, guidance, guidance_2=None, **kw):
    pipe = diffusers.WanPipeline.from_pretrained(str(folder), dtype=torch.float32)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=kw["height"], width=kw["width"],
               num_frames=kw["frames"], num_inference_steps=kw["steps"], guidance_scale=guidance,
               guidance_scale_2=guidance_2, generator=torch.Generator().manual_seed(kw["seed"]), output_type="latent")
    return out.frames


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_single_expert_latents_match_wanpipeline(diffusers_dir):
    kw = dict(width=32, height=32, frames=5, steps=6, seed=1234)
    _, result = ours(diffusers_dir, guidance=(5.0,), **kw)
    expected = reference(diffusers_dir, 5.0, **kw)
    assert result.latents.shape == expected.shape == (1, 16, 2, 4, 4)
    assert rel_err(result.latents, expected) <= 1e-4


def test_two_expert_latents_match_wanpipeline(diffusers_moe_dir):
    kw = dict(width=32, height=48, frames=9, steps=8, seed=99)
    pipe, result = ours(diffusers_moe_dir, guidance=(4.0, 3.0), **kw)
    assert pipe.model.num_experts == 2 and pipe.model.boundary == 0.875
    expected = reference(diffusers_moe_dir, 4.0, 3.0, **kw)
    assert rel_err(result.latents, expected) <= 1e-4


def test_official_and_diffusers_layouts_give_equal_latents(diffusers_dir, wan_dir):
    kw = dict(width=32, height=32, frames=5, steps=3, seed=5, guidance=(5.0,), shift=3.0, sampler="unipc")
    _, a = ours(diffusers_dir, **kw)
    _, b = ours(wan_dir, model="wan-tiny", **kw)
    assert torch.equal(a.latents, b.latents)
    assert b.frames.shape == (5, 32, 32, 3) and b.frames.dtype == torch.uint8


def test_official_two_expert_layout_loads_both_experts(diffusers_moe_dir, wan_moe_dir):
    kw = dict(width=32, height=32, frames=5, steps=4, seed=3, guidance=(4.0, 3.0), shift=12.0, sampler="unipc")
    _, a = ours(diffusers_moe_dir, **kw)
    _, b = ours(wan_moe_dir, model="wan-tiny-moe", **kw)
    assert torch.equal(a.latents, b.latents)
