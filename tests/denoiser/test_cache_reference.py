"""Skip patterns equal the reference algorithms' on a recorded sequence of timesteps.

The references are re-implemented here, independently and literally, from the published code's decision logic:
TeaCache4Wan2.1 `teacache_forward` and MagCache4Wan2.1 `magcache_forward` (one call counter `cnt` over the
interleaved cond / uncond calls, even = cond, odd = uncond, an accumulator per parity) and VideoSys'
`PABManager.if_broadcast_*` (a counter per attention module). Each is fed the schedule our engine ran (its
timesteps, and the timestep embeddings the model computes for them) and must skip exactly where we did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from smartdiff.services.denoiser.cache import (
    CacheCalibration,
    CacheConfig,
    CacheStats,
    MagCacheParams,
    PabParams,
    TeaCacheParams,
)
from smartdiff.services.denoiser.cache.published import MAGCACHE_RATIOS, TEACACHE_COEFFICIENTS
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.samplers import make_sampler
from smartdiff.shared.config import load_model_config
from smartdiff.shared.request import GenerationRequest, resolve_request

STEPS = 20


@pytest.fixture(scope="module")
def tiny():
    return DenoiserEngine.load(load_model_config("wan-tiny"), None, "cpu", torch.float32, enable_flexcache=True)


def run(engine, cache, steps=STEPS, batch_cfg=True) -> list[int]:
    """Our engine's block-stack (or attention) reuse per step, summed over the two CFG branches."""
    eng = DenoiserEngine(engine.model, engine.experts, "cpu", torch.float32, batch_cfg=batch_cfg,
                         enable_flexcache=True, cache_calibration=engine.flexcache.calibration)
    req = resolve_request(GenerationRequest(prompt="p", width=32, height=32, frames=5, steps=steps, seed=3), eng.model)
    g = torch.Generator().manual_seed(0)
    stats = CacheStats()
    eng.denoise(req, torch.randn(6, 32, generator=g), torch.randn(4, 32, generator=g), cache=cache, cache_stats=stats)
    return stats


def recorded_timesteps(engine, steps=STEPS) -> list[float]:
    m = engine.model.defaults
    return make_sampler(m.sampler, steps, m.shift, engine.model.num_train_timesteps).timesteps.tolist()


# ---- TeaCache4Wan2.1, teacache_forward: the decision part, transcribed ----

def reference_teacache(inputs: list[torch.Tensor], num_steps: int, thresh: float, coefficients, ret_steps: int,
                       cutoff_steps: int) -> list[int]:
    """inputs[i]: the modulated input of step i (e, or e0 with use_ret_steps). Returns skipped calls per step."""
    cnt, acc_even, acc_odd, prev_even, prev_odd = 0, 0.0, 0.0, None, None
    skipped = [0] * num_steps
    for step in range(num_steps):
        for _ in ("cond", "uncond"):
            modulated_inp = inputs[step]
            rescale_func = np.poly1d(coefficients)
            if cnt % 2 == 0:
                if cnt < ret_steps or cnt >= cutoff_steps:
                    should_calc, acc_even = True, 0
                else:
                    acc_even += rescale_func(((modulated_inp - prev_even).abs().mean() / prev_even.abs().mean()).item())
                    if acc_even < thresh:
                        should_calc = False
                    else:
                        should_calc, acc_even = True, 0
                prev_even = modulated_inp.clone()
            else:
                if cnt < ret_steps or cnt >= cutoff_steps:
                    should_calc, acc_odd = True, 0
                else:
                    acc_odd += rescale_func(((modulated_inp - prev_odd).abs().mean() / prev_odd.abs().mean()).item())
                    if acc_odd < thresh:
                        should_calc = False
                    else:
                        should_calc, acc_odd = True, 0
                prev_odd = modulated_inp.clone()
            skipped[step] += not should_calc
            cnt += 1
    return skipped


TEACACHE_CASES = [  # (use_ret_steps, threshold, coefficients, warmup, final)
    (False, 1.0, (1.0, 0.0), None, None),
    (False, 2.0, (1.0, 0.0), None, None),
    (True, 1.5, (1.0, 0.0), None, None),
    (False, 1.2, (0.5, 0.4, 0.0), 3, 2),
    (True, 0.05, (1.0, -0.9), 2, 3),  # negative rescaled changes: the accumulator can fall
    (False, 500.0, TEACACHE_COEFFICIENTS["Wan2.1-T2V-1.3B"][0], None, None),
]


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("ret, thresh, coefficients, warmup, final", TEACACHE_CASES)
def test_teacache_skips_where_teacache4wan_does(tiny, ret, thresh, coefficients, warmup, final, batch_cfg):
    params = TeaCacheParams(thresh, warmup, final, ret, coefficients)
    ours = [s.reused["block_stack"] for s in run(tiny, CacheConfig("teacache", params), batch_cfg=batch_cfg).steps]
    dit = tiny.experts[0]
    with torch.no_grad():
        inputs = [dit.embed_time(torch.full((1,), t))[int(ret)] for t in recorded_timesteps(tiny)]
    # the reference's settings, in calls: warm-up 1 or 5 steps, cut-off at the last step or none (ret steps)
    warmup = (5 if ret else 1) if warmup is None else warmup
    final = (0 if ret else 1) if final is None else final
    reference = reference_teacache(inputs, STEPS, thresh, coefficients, warmup * 2, STEPS * 2 - final * 2)
    assert ours == reference
    assert any(ours) or thresh == 500.0


def test_teacache_cases_are_not_trivial(tiny):
    patterns = [[s.reused["block_stack"] for s in run(tiny, CacheConfig("teacache", TeaCacheParams(t, w, f, r, c))).steps]
                for r, t, c, w, f in TEACACHE_CASES[:5]]
    assert all(0 < sum(p) < 2 * STEPS for p in patterns)


# ---- MagCache4Wan2.1, magcache_forward: the decision part, transcribed ----

def nearest_interp(src_array, target_length):
    src_length = len(src_array)
    if target_length == 1:
        return np.array([src_array[-1]])
    scale = (src_length - 1) / (target_length - 1)
    mapped_indices = np.round(np.arange(target_length) * scale).astype(int)
    return src_array[mapped_indices]


def reference_magcache(published_interleaved, sample_steps, thresh, K, retention_ratio) -> list[int]:
    mag_ratios = np.array([1.0] * 2 + published_interleaved)
    if len(mag_ratios) != sample_steps * 2:
        con = nearest_interp(mag_ratios[0::2], sample_steps)
        ucon = nearest_interp(mag_ratios[1::2], sample_steps)
        mag_ratios = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
    num_steps = sample_steps * 2
    acc_ratio, acc_steps, acc_err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    skipped = [0] * sample_steps
    for cnt in range(num_steps):
        skip_forward = False
        if cnt >= int(num_steps * retention_ratio):
            acc_ratio[cnt % 2] = acc_ratio[cnt % 2] * mag_ratios[cnt]
            acc_steps[cnt % 2] += 1
            acc_err[cnt % 2] += np.abs(1 - acc_ratio[cnt % 2])
            if acc_err[cnt % 2] < thresh and acc_steps[cnt % 2] <= K:
                skip_forward = True
            else:
                acc_err[cnt % 2], acc_steps[cnt % 2], acc_ratio[cnt % 2] = 0, 0, 1.0
        skipped[cnt // 2] += skip_forward
    return skipped


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("thresh, k, retention", [(0.12, 2, 0.2), (0.24, 4, 0.2), (0.06, 6, 0.1), (0.5, 3, 0.4)])
def test_magcache_skips_where_magcache4wan_does(tiny, steps, thresh, k, retention):
    cond, uncond = MAGCACHE_RATIOS["Wan2.1-T2V-1.3B"]
    interleaved = [v for pair in zip(cond[1:], uncond[1:]) for v in pair]  # as published: cond, uncond, ...
    engine = DenoiserEngine(tiny.model, tiny.experts, "cpu", torch.float32, enable_flexcache=True,
                            cache_calibration=CacheCalibration("wan-tiny", 50, (), (cond, uncond)))
    params = MagCacheParams(thresh, k, retention)
    ours = [s.reused["block_stack"] for s in run(engine, CacheConfig("magcache", params), steps=steps).steps]
    assert ours == reference_magcache(interleaved, steps, thresh, k, retention)
    assert any(ours)


# ---- VideoSys PABManager.if_broadcast_spatial / if_broadcast_cross, transcribed ----

def reference_pab(timesteps, skip_range, threshold) -> list[bool]:
    count, flags = 0, []
    for timestep in timesteps:
        flags.append(count % skip_range != 0 and threshold[0] < timestep < threshold[1])
        count = (count + 1) % len(timesteps)
    return flags


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("self_range, cross_range, window", [
    (2, 6, None), (3, 5, (100.0, 800.0)), (2, 2, (0.0, 1000.0)), (4, 1, (300.0, 990.0)),
])
def test_pab_broadcasts_where_videosys_does(tiny, self_range, cross_range, window, batch_cfg):
    params = PabParams(self_range, cross_range, *(reversed(window) if window else (None, None)))
    stats = run(tiny, CacheConfig("pab", params), batch_cfg=batch_cfg)
    applied = stats.applied.params
    ts = recorded_timesteps(tiny)
    per_step = 2 * tiny.model.dit.num_layers  # branches x blocks
    for kind, rng in (("self_attention", self_range), ("cross_attention", cross_range)):
        expected = reference_pab(ts, rng, (applied.timestep_end, applied.timestep_start))
        assert [s.reused[kind] for s in stats.steps] == [per_step * f for f in expected], kind
    assert sum(s.reused["self_attention"] for s in stats.steps) > 0
