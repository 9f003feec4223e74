"""low_mem_level 3: the DiT streamed from host memory gives the resident run's latents, bit for bit.

No CUDA here, so the streaming runs with the CPU as both host and device (MemoryPolicy.offload_without_cuda,
test only): parameters are really re-pointed at slot buffers that receive copies, which proves the mechanism
(which weights are where, when, and the learned prefetch order); the overlap of copies with compute on a side
stream is measured by bench/low_mem.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from smartdiff.services.denoiser.cache import CacheConfig, CacheStats, TeaCacheParams
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.offload import BlockOffloader, stream_units
from smartdiff.services.denoiser.weights import random_dit
from smartdiff.shared.config import load_model_config
from smartdiff.shared.memory import MemoryPolicy, MemoryPolicyError
from smartdiff.shared.request import GenerationRequest, resolve_request

OFFLOAD_ON_CPU = MemoryPolicy(3, offload_without_cuda=True)
SHAPE = dict(width=64, height=48, frames=9, steps=6, seed=11)


def inputs(name: str, **kw):
    model = load_model_config(name)
    req = resolve_request(GenerationRequest(prompt="x", **{**SHAPE, **kw}), model)
    gen = torch.Generator().manual_seed(0)
    dim = model.dit.text_dim
    return model, req, torch.randn(7, dim, generator=gen), torch.randn(4, dim, generator=gen)


def _in(t: torch.Tensor, buf: torch.Tensor) -> bool:
    start = buf.data_ptr()
    return start <= t.data_ptr() < start + buf.numel()


class WhereWeightsAre:
    """Hooks (run after the offloader's) that check, inside each unit's forward, that exactly that unit's
    tensors are in a device slot and every other unit's are in its host buffer."""

    def __init__(self, off: BlockOffloader):
        self.off, self.calls, self.handles = off, [], []
        for u in off.units:
            self.handles.append(u.module.register_forward_pre_hook(lambda m, a, u=u: self.check(u)))

    def check(self, running) -> None:
        self.calls.append(running.name)
        for u in self.off.units:
            for t in u.tensors:
                if u is running:
                    assert any(_in(t, s.buf) for s in self.off.slots), f"{u.name} not in a slot while running"
                else:
                    assert _in(t, u.host), f"{u.name} on the device while {running.name} runs"


@pytest.mark.parametrize("name", ["wan-tiny", "wan-tiny-moe"])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_offloaded_latents_equal_resident(name, batch_cfg):
    model, req, ctx, neg = inputs(name)
    resident = DenoiserEngine.load(model, None, "cpu", torch.float32, batch_cfg=batch_cfg)
    offloaded = DenoiserEngine.load(model, None, "cpu", torch.float32, batch_cfg=batch_cfg,
                                    low_mem_level=OFFLOAD_ON_CPU)
    watch = WhereWeightsAre(offloaded.offloader)
    expected = resident.denoise(req, ctx, neg)
    got = offloaded.denoise(req, ctx, neg)
    assert torch.equal(got, expected)
    assert len(watch.calls) > 0
    for u in offloaded.offloader.units:  # after the request every weight is back in host memory
        assert all(_in(t, u.host) for t in u.tensors)
    if name == "wan-tiny-moe":  # each expert's units ran only during its own steps
        switch = next(i for i, c in enumerate(watch.calls) if c.startswith("expert1"))
        assert all(c.startswith("expert0") for c in watch.calls[:switch])
        assert all(c.startswith("expert1") for c in watch.calls[switch:])


def test_offloaded_latents_equal_resident_with_a_block_stack_cache():
    model, req, ctx, neg = inputs("wan-tiny", steps=10)
    cache = CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=5.0))
    runs = []
    for level in (0, OFFLOAD_ON_CPU):
        engine = DenoiserEngine.load(model, None, "cpu", torch.float32, enable_flexcache=True,
                                     low_mem_level=level)
        stats = CacheStats()
        runs.append((engine.denoise(req, ctx, neg, cache=cache, cache_stats=stats), stats.cached_steps))
    (resident, skipped), (offloaded, skipped_offloaded) = runs
    assert skipped > 0 and skipped_offloaded == skipped
    assert torch.equal(offloaded, resident)


def test_a_request_stopped_between_blocks_leaves_the_streaming_intact():
    """A cancel between two blocks leaves a prefetch in flight and a unit order the next request does not follow;
    every weight is back in host memory, and the next request still gives the resident run's latents."""
    from smartdiff.shared.errors import Cancelled

    model, req, ctx, neg = inputs("wan-tiny")
    offloaded = DenoiserEngine.load(model, None, "cpu", torch.float32, low_mem_level=OFFLOAD_ON_CPU)
    polls = []
    with pytest.raises(Cancelled, match="during step 2/"):
        offloaded.denoise(req, ctx, neg, interrupt=lambda: polls.append(1) or len(polls) > 1)
    for u in offloaded.offloader.units:
        assert all(_in(t, u.host) for t in u.tensors), u.name
    resident = DenoiserEngine.load(model, None, "cpu", torch.float32)
    assert torch.equal(offloaded.denoise(req, ctx, neg), resident.denoise(req, ctx, neg))


def test_two_slots_hold_the_device_weights_and_the_order_is_learned():
    cfg = load_model_config("wan-tiny").dit
    dit = random_dit(cfg, "cpu", torch.float32, seed=0)
    units = stream_units(dit)
    assert [type(m).__name__ for m in units] == (
        ["Conv3d", "Sequential", "Sequential", "Sequential"] + ["WanAttentionBlock"] * cfg.num_layers
        + ["WanHead"])
    off = BlockOffloader([dit], "cpu")
    biggest = max(u.host.numel() for u in off.units)
    assert len(off.slots) == 2 and off.slot_bytes == 2 * biggest
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = dit.embed_text(torch.randn(1, cfg.text_len, cfg.text_dim))
    t = torch.tensor([500.0])
    with torch.inference_mode():
        first = dit(x, t, ctx, context_embedded=True)
        off.stats.waited = off.stats.loads = off.stats.prefetched = 0
        again = dit(x, t, ctx, context_embedded=True)
    assert torch.equal(first, again)
    # The text embedding ran once, then was skipped: the order is learned, so every unit of the second
    # forward was already in a slot (copied while the previous unit ran) when called.
    assert off.stats.waited == 0 and off.stats.prefetched == off.stats.loads == len(off.units) - 1


def test_level_3_without_cuda_is_refused_before_loading(tmp_path):
    model = load_model_config("wan-tiny")
    with pytest.raises(MemoryPolicyError, match=r"--low-mem-level 3 .* needs a CUDA device, got device cpu"):
        DenoiserEngine.load(model, None, "cpu", torch.float32, low_mem_level=3)
    experts = [random_dit(model.dit, "cpu", torch.float32, seed=0)]
    with pytest.raises(MemoryPolicyError, match="--low-mem-level 3"):
        DenoiserEngine(model, experts, "cpu", torch.float32, low_mem_level=3)


def test_levels_below_3_keep_the_dit_resident():
    model = load_model_config("wan-tiny")
    for level in (0, 1, 2):
        engine = DenoiserEngine.load(model, None, "cpu", torch.float32, low_mem_level=level)
        assert engine.offloader is None and int(engine.memory.level) == level
