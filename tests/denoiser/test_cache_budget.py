"""The budget cache: its plan is the cheapest one (checked by brute force), it computes exactly the share asked for
per expert and branch, follows the calibrated reuse errors, and refuses what it cannot honour with the field."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from smartdiff.services.denoiser.cache import BudgetParams, CacheCalibration, CacheConfig, CacheStats, FlexCache
from smartdiff.services.denoiser.cache.budget import computed_steps, plan
from smartdiff.services.denoiser.cache.calibrate import calibrate
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.shared.config import load_model_config
from smartdiff.shared.errors import RequestError
from smartdiff.shared.request import GenerationRequest, resolve_request

STEPS = 12


@pytest.fixture(scope="module", params=["wan-tiny", "wan-tiny-moe"])
def engine(request):
    return DenoiserEngine.load(load_model_config(request.param), None, "cpu", torch.float32, enable_flexcache=True)


def request(engine, steps=STEPS, seed=1, **kw):
    return resolve_request(GenerationRequest(prompt="p", width=32, height=32, frames=5, steps=steps, seed=seed, **kw),
                           engine.model)


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 32, generator=g), torch.randn(5, 32, generator=g)


def brute_force(costs, computed, max_skip):
    """Every admissible set of computed steps (step 0 included), with its summed cost."""
    n, best = len(costs), (math.inf, None)
    for rest in itertools.combinations(range(1, n), computed - 1):
        chosen = (0, *rest)
        total, ok = 0.0, True
        for s in range(n):
            last = max(c for c in chosen if c <= s)
            if s != last:
                ok &= s - last <= max_skip
                total += costs[s][s - last - 1] if ok else 0.0
        if ok and total < best[0]:
            best = (total, list(chosen))
    return best


@pytest.mark.parametrize("n,computed,max_skip", [(9, 4, 2), (10, 3, 4), (8, 8, 0), (7, 1, 6), (11, 6, 1)])
def test_plan_is_the_cheapest_admissible_one(n, computed, max_skip):
    rng = random.Random(n * 100 + computed)
    costs = [[rng.random() * (d + 1) for d in range(max_skip + 1)] for _ in range(n)]
    chosen = plan(costs, computed, max_skip)
    cost, _ = brute_force(costs, computed, max_skip)
    assert len(chosen) == computed and chosen[0] == 0 and chosen == sorted(set(chosen))
    assert max(b - a for a, b in zip(chosen, chosen[1:] + [n])) <= max_skip + 1
    got = sum(costs[s][s - max(c for c in chosen if c <= s) - 1] for s in range(n) if s not in chosen)
    assert got == pytest.approx(cost, rel=1e-12)


def test_plan_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="no plan"):
        plan([[1.0]] * 6, 2, 1)  # 2 computed steps can cover at most 4 with one reused after each


def test_computes_exactly_the_share_per_expert_and_branch(engine):
    stats = CacheStats()
    ctx, neg = embeddings()
    engine.denoise(request(engine), ctx, neg, cache=CacheConfig("budget", BudgetParams(compute_fraction=0.4)),
                   cache_stats=stats)
    sched = [r.expert for r in stats.steps]
    expected = sum(2 * computed_steps(0.4, sched.count(k)) for k in set(sched))  # two CFG branches each
    assert stats.computed["block_stack"] == expected
    assert stats.reused["block_stack"] == 2 * STEPS - expected
    for k in set(sched):  # each expert's first step computes (nothing to reuse before it)
        first = next(r for r in stats.steps if r.expert == k)
        assert first.computed["block_stack"] == 2
    assert stats.applied.params == BudgetParams(0.4, 4)


def test_follows_the_calibrated_reuse_errors():
    """A step that is costly to reuse computes; without a calibration, the plan is the cheapest one under
    err = distance weighted by each step's sigma decrement (checked by brute force over every admissible plan)."""
    eng = DenoiserEngine.load(load_model_config("wan-tiny"), None, "cpu", torch.float32, enable_flexcache=True)
    row = (1.0, 2.0, 3.0, 4.0, 5.0)
    costly = tuple(tuple(r * (1000.0 if i == 7 else 1.0) for r in row) for i in range(STEPS))
    calibrated = planned(eng, CacheCalibration("wan-tiny", STEPS, reuse_error=(costly, costly)))
    assert len(calibrated) == 3 and calibrated[0] == 0 and 7 in calibrated
    sigmas = [t / 1000.0 for t in eng_timesteps(eng)] + [0.0]
    by_distance = [[(sigmas[s] - sigmas[s + 1]) * d for d in range(1, min(s, 4) + 1)] for s in range(STEPS)]
    assert planned(eng, None) == brute_force(by_distance, 3, 4)[1]


def test_calibration_records_reuse_errors_that_grow_with_distance(tmp_path):
    eng = DenoiserEngine.load(load_model_config("wan-tiny-moe"), None, "cpu", torch.float32, enable_flexcache=True)
    ctx, neg = embeddings()
    cal = calibrate(eng, [(request(eng, seed=3), ctx, neg)])
    cond, uncond = cal.reuse_error
    assert cal.timesteps == tuple(eng_timesteps(eng))
    assert all(math.isinf(v) for v in cond[0])  # nothing before the first step
    experts = [eng.expert_index(t) for t in eng_timesteps(eng)]
    second = experts.index(1)
    assert all(math.isinf(v) for v in cond[second])  # the other expert's residuals are never reused
    assert all(math.isfinite(v) and v > 0 for v in cond[second + 1][:1] + uncond[2][:2])
    assert cond[5][0] < cond[5][2]  # on average, an older residual is a worse stand-in
    cal.to_yaml(tmp_path / "c.yaml")
    assert CacheCalibration.from_yaml(tmp_path / "c.yaml") == cal
    eng.flexcache = FlexCache(eng.model, True, cal)
    stats = CacheStats()
    eng.denoise(request(eng), ctx, neg, cache=CacheConfig("budget"), cache_stats=stats)
    assert stats.reused["block_stack"] > 0


def eng_timesteps(eng):
    from smartdiff.services.denoiser.samplers import make_sampler

    req = request(eng)
    return make_sampler(req.sampler, req.steps, req.shift, eng.model.num_train_timesteps).timesteps.tolist()


def test_refusals_name_the_field():
    eng = DenoiserEngine.load(load_model_config("wan-tiny"), None, "cpu", torch.float32, enable_flexcache=True)
    ctx, neg = embeddings()

    def refused(cache, steps=STEPS):
        with pytest.raises(RequestError) as info:
            eng.denoise(request(eng, steps=steps), ctx, neg, cache=cache)
        return info.value

    err = refused(CacheConfig("budget", BudgetParams(compute_fraction=0.1, max_skip_steps=2)))
    assert err.field == "cache.budget.compute_fraction" and "at least 4 must compute" in str(err)
    assert "above 0.25" in str(err)  # 3 of 12 would be too few: any fraction above 3/12 computes 4
    table = tuple((1.0, 2.0) for _ in range(STEPS))
    with pytest.raises(ValueError, match="reuse_error"):
        CacheCalibration("wan-tiny", STEPS, reuse_error=(table, table[1:]))
    out = eng.denoise(request(eng), ctx, neg, cache=CacheConfig("budget", BudgetParams(max_skip_steps=2)))
    assert torch.isfinite(out).all()  # the engine serves the next, valid request


def planned(eng, cal, steps=STEPS, **kw):
    eng.flexcache = FlexCache(eng.model, True, cal)
    stats = eng.plan_cache(request(eng, steps=steps, **kw), CacheConfig("budget", BudgetParams(compute_fraction=0.25)))
    return [r.step for r in stats.steps if r.computed["block_stack"]]


def test_a_calibration_of_another_schedule_or_with_gaps_falls_back_to_the_distance_rule():
    eng = DenoiserEngine.load(load_model_config("wan-tiny"), None, "cpu", torch.float32, enable_flexcache=True)
    row = (1.0, 2.0, 3.0, 4.0, 5.0)
    costly = tuple(tuple(r * (1000.0 if i == 7 else 1.0) for r in row) for i in range(STEPS))
    times = tuple(eng_timesteps(eng))
    calibrated = planned(eng, CacheCalibration("wan-tiny", STEPS, reuse_error=(costly, costly), timesteps=times))
    uncalibrated = planned(eng, None)
    assert 7 in calibrated and calibrated != uncalibrated
    # another step count, another shift (other timesteps), or a step never measured: the table is not used
    assert planned(eng, CacheCalibration("wan-tiny", STEPS + 1, reuse_error=((row,) * (STEPS + 1),) * 2),
                   steps=STEPS + 1) == planned(eng, None, steps=STEPS + 1)
    assert planned(eng, CacheCalibration("wan-tiny", STEPS, reuse_error=(costly, costly), timesteps=times),
                   shift=1.0) == planned(eng, None, shift=1.0)
    gap = tuple(tuple(math.inf for _ in row) if i == 3 else r for i, r in enumerate(costly))
    assert planned(eng, CacheCalibration("wan-tiny", STEPS, reuse_error=(costly, gap), timesteps=times)) == uncalibrated
    narrow = tuple(r[:2] for r in costly)  # measured 2 steps back; the request may reuse 4 in a row
    assert planned(eng, CacheCalibration("wan-tiny", STEPS, reuse_error=(narrow, narrow), timesteps=times)) == \
        uncalibrated


def test_the_share_is_the_same_from_python_and_from_the_proto():
    import numpy as np

    for fraction in (0.35, 0.48, 0.36, 0.5, 0.1, 1.0):
        for n in (7, 10, 12, 50):
            assert computed_steps(float(np.float32(fraction)), n) == computed_steps(fraction, n) == \
                max(1, math.ceil(round(fraction * n, 6)))


def test_plan_is_fast_for_long_schedules_and_long_skips():
    import time

    rng = random.Random(0)
    costs = [[rng.random() for _ in range(min(s, 199))] for s in range(200)]
    start = time.perf_counter()
    chosen = plan(costs, 100, 199)
    assert len(chosen) == 100 and time.perf_counter() - start < 5.0
