"""FlexCache behaviour users rely on: exact when disabled by its parameters, isolated per request, memory freed,
refused with a named field when it cannot run, Wan2.2 experts and CFG branches kept apart, calibration."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch
from smartdiff.denoiser.v1 import options_pb2
from smartdiff.services.denoiser.cache import (
    BudgetParams,
    CacheCalibration,
    CacheConfig,
    CacheStats,
    FlexCache,
    MagCacheParams,
    PabParams,
    TeaCacheParams,
    cache_config_from_proto,
    cache_config_to_proto,
)
from smartdiff.services.denoiser.cache.calibrate import calibrate
from smartdiff.services.denoiser.cache.published import MAGCACHE_RATIOS, TEACACHE_COEFFICIENTS
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.samplers import make_sampler
from smartdiff.shared.config import load_model_config
from smartdiff.shared.errors import Cancelled, RequestError
from smartdiff.shared.request import GenerationRequest, resolve_request

STEPS = 16
ONE_THREE_B = TEACACHE_COEFFICIENTS["Wan2.1-T2V-1.3B"]


@pytest.fixture(scope="module", params=["wan-tiny", "wan-tiny-moe"])
def engine(request):
    return DenoiserEngine.load(load_model_config(request.param), None, "cpu", torch.float32, enable_flexcache=True)


@pytest.fixture(scope="module")
def tiny():
    return DenoiserEngine.load(load_model_config("wan-tiny"), None, "cpu", torch.float32, enable_flexcache=True)


def sibling(engine: DenoiserEngine, **kw) -> DenoiserEngine:
    """Another engine on the very same expert modules (weights shared), e.g. with CFG run as two calls."""
    opts = {"batch_cfg": engine.batch_cfg, "enable_flexcache": engine.flexcache.enabled,
            "cache_calibration": engine.flexcache.calibration} | kw
    return DenoiserEngine(engine.model, engine.experts, "cpu", torch.float32, **opts)


def request(engine, steps=STEPS, seed=1, **kw):
    return resolve_request(GenerationRequest(prompt="p", width=32, height=32, frames=5, steps=steps, seed=seed,
                                             **kw), engine.model)


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 32, generator=g), torch.randn(5, 32, generator=g)


def live_tensors() -> set[int]:
    gc.collect()
    with warnings.catch_warnings():  # touching some torch module globals warns
        warnings.simplefilter("ignore")
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}


def run(engine, cache=None, stats=None, steps=STEPS, seed=1, **kw):
    ctx, neg = embeddings()
    return engine.denoise(request(engine, steps, seed, **kw), ctx, neg, cache=cache, cache_stats=stats)


EXACT = [
    CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=0.0)),
    # the published ret-steps polynomial is negative here, so the accumulator never reaches 0: still never skips
    CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=0.0, use_ret_steps=True, coefficients=ONE_THREE_B[1])),
    CacheConfig("pab", PabParams(self_attention_skip_range=1, cross_attention_skip_range=1)),
    CacheConfig("magcache", MagCacheParams(threshold=0.0)),
    CacheConfig("magcache", MagCacheParams(max_skip_steps=0)),
    CacheConfig("budget", BudgetParams(compute_fraction=1.0)),
]


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("cache", EXACT, ids=lambda c: f"{c.strategy}-{c.params}")
def test_disabling_parameters_give_exactly_the_uncached_result(engine, cache, batch_cfg):
    eng = sibling(engine, batch_cfg=batch_cfg)
    base = run(eng)
    stats = CacheStats()
    out = run(eng, cache, stats)
    assert torch.equal(out, base)
    assert sum(stats.reused.values()) == 0
    branches = 2
    assert stats.computed["block_stack"] == STEPS * branches


@pytest.mark.parametrize("cache", [
    CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=1.5)),
    CacheConfig("pab"),
    CacheConfig("magcache"),
    CacheConfig("budget"),
], ids=lambda c: c.strategy)
def test_strategies_reuse_and_report_it(engine, cache):
    base = run(engine)
    stats = CacheStats()
    out = run(engine, cache, stats)
    reused = sum(stats.reused.values())
    assert reused > 0 and stats.strategy == cache.strategy
    assert (out - base).norm() / base.norm() < 0.5  # an approximation, not garbage
    assert [s.step for s in stats.steps] == list(range(STEPS))
    assert sum(s.hit for s in stats.steps) > 0
    report = stats.to_proto()
    assert report.block_stack_computed + report.block_stack_reused == 2 * STEPS
    assert report.block_stack_reused == stats.cached_steps
    applied = cache_config_to_proto(stats.applied)  # every default filled in
    assert applied.strategy == cache.strategy and applied.WhichOneof("params") == cache.strategy


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("cache", [
    CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=1.5)),
    CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=3.0, use_ret_steps=True, coefficients=(1.0, 0.0))),
    CacheConfig("pab"),
    CacheConfig("magcache", MagCacheParams(threshold=0.5, max_skip_steps=3)),
    CacheConfig("budget", BudgetParams(compute_fraction=0.4)),
    CacheConfig("none"),
], ids=lambda c: f"{c.strategy}-{c.params}")
@pytest.mark.parametrize("last_unguided", [False, True], ids=["guided", "last-expert-unguided"])
def test_plan_predicts_what_a_real_run_computes(engine, cache, batch_cfg, last_unguided):
    eng = sibling(engine, batch_cfg=batch_cfg)
    kw = {}
    if last_unguided:  # wan-tiny: no CFG at all; wan-tiny-moe: CFG on the first expert only
        n = eng.model.num_experts
        kw["guidance"] = (5.0,) * (n - 1) + (1.0,)
    real = CacheStats()
    run(eng, cache, real, **kw)
    planned = eng.plan_cache(request(eng, **kw), cache)
    assert planned.computed == real.computed and planned.reused == real.reused
    assert [s.hit for s in planned.steps] == [s.hit for s in real.steps]
    if cache.strategy != "none":
        assert sum(planned.reused.values()) > 0  # the plan is not trivially "compute everything"


def test_cached_tensors_are_freed_after_each_request(tiny):
    modules_before = {n: dict(vars(m)).keys() for n, m in tiny.experts[0].named_modules()}
    run(tiny)  # warm any lazy state
    for cache in (CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=1.5)), CacheConfig("pab"),
                  CacheConfig("magcache"), CacheConfig("budget")):
        before = live_tensors()
        out = run(tiny, cache)
        assert live_tensors() - before == {id(out)}, cache.strategy
        del out
    # nothing was attached to the model: no torch hooks, no new attributes
    assert {n: dict(vars(m)).keys() for n, m in tiny.experts[0].named_modules()} == modules_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.experts[0].modules())


@pytest.mark.parametrize("where", ["cancelled", "interrupt"])
def test_cache_is_freed_when_the_request_is_cancelled(tiny, where):
    """Cancelled before a step (`cancelled`, polled per step) or inside one (`interrupt`, polled between DiT
    blocks, mid-step with the cache's hooks running): the request's cached tensors go either way."""
    def live_after_cancel(cache):
        calls = []

        def stop():  # once past the first steps, with the cache's state built
            calls.append(1)
            return len(calls) > (8 if where == "cancelled" else 2)

        ctx, neg = embeddings()
        before = live_tensors()
        with pytest.raises(Cancelled, match="before step" if where == "cancelled" else "during step") as info:
            tiny.denoise(request(tiny), ctx, neg, cache=cache, **{where: stop})
        del info  # its traceback's frames hold the step's tensors
        return len(live_tensors() - before)

    live_after_cancel(None)  # first use: the model's lazily built tables (RoPE) stay, as they should
    for cache in (None, CacheConfig("pab"), CacheConfig("magcache"), CacheConfig("budget")):
        assert live_after_cancel(cache) == 0, cache


def test_concurrent_requests_with_different_settings_do_not_affect_each_other(engine):
    configs = [CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=1.5)), CacheConfig("pab"),
               CacheConfig("magcache", MagCacheParams(max_skip_steps=3)), CacheConfig("budget"), None]
    alone = [run(engine, c, seed=i) for i, c in enumerate(configs)]
    barrier = threading.Barrier(len(configs))
    results, errors = [None] * len(configs), []

    def worker(i, cache):
        try:
            ctx, neg = embeddings()
            results[i] = engine.denoise(request(engine, seed=i), ctx, neg, cache=cache,
                                        progress=lambda *_: barrier.wait(timeout=60))  # steps interleave
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(configs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(len(configs)):
        assert torch.equal(results[i], alone[i]), configs[i]


def test_decisions_do_not_read_the_tokens(engine):
    """Sequence parallel: ranks hold different token shards, so a decision must not depend on them."""
    for cache in (CacheConfig("teacache", TeaCacheParams(rel_l1_threshold=1.5)), CacheConfig("pab"),
                  CacheConfig("magcache"), CacheConfig("budget")):
        patterns = []
        for seed in (1, 2):
            stats = CacheStats()
            run(engine, cache, stats, seed=seed)
            patterns.append([(dict(s.computed), dict(s.reused)) for s in stats.steps])
        assert patterns[0] == patterns[1], cache.strategy


def test_branches_decide_separately_and_compute_only_their_rows(tiny):
    """MagCache ratios differ per branch: with batched CFG the branches disagree at some steps, and the result
    equals running the branches as two calls."""
    ratios = ((1.0,) * STEPS, (1.0,) + (0.93,) * (STEPS - 1))
    cal = CacheCalibration("wan-tiny", STEPS, (), ratios)
    cache = CacheConfig("magcache", MagCacheParams(threshold=0.2, max_skip_steps=4, retention_ratio=0.2))
    batched, separate = CacheStats(), CacheStats()
    a = run(sibling(tiny, cache_calibration=cal), cache, batched)
    b = run(sibling(tiny, cache_calibration=cal, batch_cfg=False), cache, separate)
    per_step = [s.reused["block_stack"] for s in batched.steps]
    assert 1 in per_step  # one branch reused, the other computed, in one batched call
    assert per_step == [s.reused["block_stack"] for s in separate.steps]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_two_experts_keep_separate_state(tiny):
    moe = DenoiserEngine.load(load_model_config("wan-tiny-moe"), None, "cpu", torch.float32, enable_flexcache=True)
    stats = CacheStats()
    run(moe, CacheConfig("magcache", MagCacheParams(retention_ratio=0.0, max_skip_steps=100, threshold=1.0)), stats)
    experts = [s.expert for s in stats.steps]
    switch = experts.index(1)
    assert 0 < switch < STEPS
    # each expert's first step computes (no residual of the other expert is ever reused), then reuse starts
    assert stats.steps[0].reused["block_stack"] == 0 and stats.steps[switch].reused["block_stack"] == 0
    assert stats.steps[switch + 1].reused["block_stack"] == 2


def test_disabled_deployment_refuses_with_the_field(tiny):
    off = sibling(tiny, enable_flexcache=False)
    with pytest.raises(RequestError) as info:
        run(off, CacheConfig("teacache"))
    assert info.value.field == "cache.strategy" and "disabled on this deployment" in info.value.rule
    assert torch.equal(run(off, CacheConfig("none")), run(off))
    assert not any(i.available for i in off.flexcache.strategy_infos() if i.name != "none")


def test_published_numbers_and_wan22_needs_calibration():
    sampler = make_sampler("unipc", 50, 5.0, 1000)
    ts = sampler.timesteps.tolist()
    small = FlexCache(load_model_config("Wan2.1-T2V-1.3B"), True)
    applied = small.resolve(CacheConfig("teacache"), ts, lambda t: 0).params
    assert applied == TeaCacheParams(0.08, 1, 1, False, ONE_THREE_B[0])
    applied = small.resolve(CacheConfig("teacache", TeaCacheParams(use_ret_steps=True)), ts, lambda t: 0).params
    assert applied == TeaCacheParams(0.10, 5, 0, True, ONE_THREE_B[1])
    assert small.resolve(CacheConfig("magcache"), ts, lambda t: 0).params == MagCacheParams(0.12, 2, 0.2)
    pab = small.resolve(CacheConfig("pab"), ts, lambda t: 0).params
    inside = [t for t in ts if pab.timestep_end < t < pab.timestep_start]
    assert len(inside) == 35 and (pab.self_attention_skip_range, pab.cross_attention_skip_range) == (2, 6)

    a14b = load_model_config("Wan2.2-T2V-A14B")
    big = FlexCache(a14b, True)
    expert = lambda t: 0 if t >= 875 else 1
    with pytest.raises(RequestError) as info:
        big.resolve(CacheConfig("teacache"), ts, expert)
    assert info.value.field == "cache.teacache.coefficients" and "calibrate-cache" in info.value.rule
    assert big.resolve(CacheConfig("magcache"), ts, expert).params == MagCacheParams(0.06, 2, 0.4)
    assert "MagCache" not in "".join(i.unavailable_reason for i in big.strategy_infos())
    cal = CacheCalibration(a14b.name, 40, ((ONE_THREE_B[0], ONE_THREE_B[1]), ((1.0, 0.0), (2.0, 0.0))))
    applied = FlexCache(a14b, True, cal).resolve(CacheConfig("teacache"), ts, expert).params
    assert applied.coefficients is None and applied.rel_l1_threshold == 0.1  # per expert, ours


def test_proto_round_trip_and_validation():
    msg = options_pb2.CacheConfig(strategy="teacache", teacache=options_pb2.TeaCacheParams(
        rel_l1_threshold=0.25, use_ret_steps=True, coefficients=[1.0, 0.5]))
    cfg = cache_config_from_proto(msg)
    assert cfg == CacheConfig("teacache", TeaCacheParams(0.25, None, None, True, (1.0, 0.5)))
    assert cache_config_from_proto(cache_config_to_proto(cfg)) == cfg
    assert cache_config_from_proto(options_pb2.CacheConfig()) == CacheConfig("none")
    mag = options_pb2.CacheConfig(strategy="magcache", magcache=options_pb2.MagCacheParams(max_skip_steps=3))
    assert cache_config_from_proto(mag).params == MagCacheParams(max_skip_steps=3)
    budget = options_pb2.CacheConfig(strategy="budget", budget=options_pb2.BudgetParams(compute_fraction=0.25))
    assert cache_config_from_proto(budget).params == BudgetParams(compute_fraction=0.25)
    bad = [
        (options_pb2.CacheConfig(strategy="fastcache"), "cache.strategy"),
        (options_pb2.CacheConfig(strategy="teacache", pab=options_pb2.PabParams()), "cache.pab"),
        (options_pb2.CacheConfig(strategy="pab", pab=options_pb2.PabParams(self_attention_skip_range=0)),
         "cache.pab.self_attention_skip_range"),
        (options_pb2.CacheConfig(strategy="pab", pab=options_pb2.PabParams(timestep_start=100, timestep_end=800)),
         "cache.pab.timestep_end"),
        (options_pb2.CacheConfig(strategy="teacache", teacache=options_pb2.TeaCacheParams(rel_l1_threshold=-1)),
         "cache.teacache.rel_l1_threshold"),
        (options_pb2.CacheConfig(strategy="magcache", magcache=options_pb2.MagCacheParams(retention_ratio=1.0)),
         "cache.magcache.retention_ratio"),
        (options_pb2.CacheConfig(strategy="budget", budget=options_pb2.BudgetParams(compute_fraction=0.0)),
         "cache.budget.compute_fraction"),
        (options_pb2.CacheConfig(strategy="budget", budget=options_pb2.BudgetParams(compute_fraction=1.5)),
         "cache.budget.compute_fraction"),
    ]
    for msg, field in bad:
        with pytest.raises(RequestError) as info:
            cache_config_from_proto(msg)
        assert info.value.field == field


def test_calibration_fits_every_expert_and_is_used(tmp_path, monkeypatch):
    from smartdiff.services.denoiser.cache import calibrate as calibration

    held = []  # (expert, branch) keys whose residuals the recorder still holds when a run ends
    close = calibration._Recorder.close
    monkeypatch.setattr(calibration._Recorder, "close", lambda self: (held.append(sorted(self.history)), close(self)))
    moe = DenoiserEngine.load(load_model_config("wan-tiny-moe"), None, "cpu", torch.float32, enable_flexcache=True)
    runs = []
    for seed in range(3):
        ctx, neg = embeddings(seed)
        runs.append((request(moe, steps=12, seed=seed), ctx, neg))
    cal = calibrate(moe, runs)
    assert held and all(keys == [(1, 0), (1, 1)] for keys in held)  # the first expert's residuals were freed
    assert len(cal.teacache) == 2 and all(len(c) == 5 for pair in cal.teacache for c in pair)
    assert len(cal.magcache[0]) == len(cal.magcache[1]) == 12
    assert all(len(table) == 12 and all(len(row) == 5 for row in table) for table in cal.reuse_error)
    path = tmp_path / "cal.yaml"
    cal.to_yaml(path)
    loaded = CacheCalibration.from_yaml(path)
    assert loaded == cal
    calibrated = sibling(moe, cache_calibration=loaded)
    stats = CacheStats()
    run(calibrated, CacheConfig("teacache"), stats)
    assert stats.applied.params.coefficients in (None, loaded.teacache[0][0])
    assert stats.computed["block_stack"] + stats.reused["block_stack"] == 2 * STEPS


def test_calibrate_cli_writes_yaml(tmp_path):
    from smartdiff.services.gateway.cli import main

    out = tmp_path / "tiny.yaml"
    assert main(["calibrate-cache", "--model", "wan-tiny", "--width", "32", "--height", "32", "--frames", "5",
                 "--steps", "8", "--prompt", "a", "--prompt", "b", "--out", str(out)]) == 0
    cal = CacheCalibration.from_yaml(out)
    assert cal.model == "wan-tiny" and cal.steps == 8 and len(cal.teacache) == 1


def test_published_ratio_tables_cover_the_reference_step_counts():
    assert all(len(t) == 50 for key in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B") for t in MAGCACHE_RATIOS[key])
    assert all(len(t) == 40 for t in MAGCACHE_RATIOS["Wan2.2-T2V-A14B"])


def test_a_bad_calibration_file_is_a_config_error_naming_the_flag(tmp_path):
    """Missing, a folder, not YAML, not a mapping, empty tables, another model, or without --enable-flexcache:
    `error: --cache-calibration ...` before the denoiser serves, never a traceback or a failing request later."""
    from smartdiff.services.denoiser.server import DenoiserOptions, load_calibration
    from smartdiff.shared.config import ConfigError, load_model_config

    tiny = load_model_config("wan-tiny")
    good = tmp_path / "good.yaml"
    CacheCalibration("wan-tiny", 8, (((1.0, 0.0), (1.0, 0.0)),)).to_yaml(good)
    files = {"missing": tmp_path / "none.yaml", "folder": tmp_path}
    for name, text in {"not yaml": "steps: [3", "a list": "- 1\n- 2\n",
                       "empty magcache": "model: wan-tiny\nsteps: 8\nmagcache: {cond: [], uncond: []}\n",
                       "empty teacache": "model: wan-tiny\nsteps: 8\nteacache: [{expert: 0, coefficients: [], "
                                         "ret_steps_coefficients: [1.0]}]\n",
                       "another model": good.read_text().replace("model: wan-tiny", "model: Wan2.1-T2V-14B"),
                       "steps inf": "model: wan-tiny\nsteps: .inf\n", "steps float": "model: wan-tiny\nsteps: 8.9\n",
                       "deep": "[" * 5000, "short magcache": "model: wan-tiny\nsteps: 8\n"
                                                             "magcache: {cond: [1.0], uncond: [1.0]}\n"}.items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.yaml"
        files[name].write_text(text)
    words = {"missing": "cannot read it", "folder": "cannot read it", "not yaml": "cannot read it",
             "a list": "not a FlexCache calibration", "empty magcache": "magcache cond: need >= 1",
             "empty teacache": "coefficients: need >= 1", "another model": "fitted for 'Wan2.1-T2V-14B'",
             "steps inf": "steps must be an integer", "steps float": "steps must be an integer",
             "deep": "cannot read it", "short magcache": "magcache cond: need one ratio per step \\(8\\), got 1"}
    for name, path in files.items():
        with pytest.raises(ConfigError, match=f"^--cache-calibration {path}: .*{words[name]}"):
            load_calibration(DenoiserOptions(enable_flexcache=True, cache_calibration=str(path)), tiny)
    with pytest.raises(ConfigError, match="needs --enable-flexcache"):
        load_calibration(DenoiserOptions(cache_calibration=str(good)), tiny)
    assert load_calibration(DenoiserOptions(enable_flexcache=True, cache_calibration=str(good)), tiny).steps == 8


def test_calibrate_cli_refuses_bad_paths_before_the_runs_and_too_few_steps_cleanly(tmp_path, capsys):
    from smartdiff.services.gateway.cli import main

    small = ["calibrate-cache", "--model", "wan-tiny", "--width", "32", "--height", "32", "--frames", "5"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for flags, words in ((["--prompts-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "c.yaml")],
                          "--prompts-file"),
                         (["--prompts-file", str(empty), "--out", str(tmp_path / "c.yaml")], "holds no prompt"),
                         (["--out", str(tmp_path)], "is a directory"),
                         (["--out", str(empty / "c.yaml")], "--out: cannot create the folder"),  # under a file
                         (["--steps", "2", "--prompt", "a", "--out", str(tmp_path / "c.yaml")], "need more than")):
        assert main([*small, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 50])
def test_pab_default_window_never_holds_the_first_or_last_step(steps):
    """With 2 or 3 steps the rounding of the middle 70% gave a window over every step, the last one (x0) too."""
    ts = make_sampler("unipc", steps, 5.0, 1000).timesteps.tolist()
    pab = FlexCache(load_model_config("Wan2.1-T2V-1.3B"), True).resolve(CacheConfig("pab"), ts, lambda t: 0).params
    inside = [i for i, t in enumerate(ts) if pab.timestep_end < t < pab.timestep_start]
    assert 0 not in inside and steps - 1 not in inside and (steps < 3 or inside)


def test_pab_with_one_bound_given_takes_the_default_other_bound_up_to_it():
    ts = make_sampler("unipc", 8, 5.0, 1000).timesteps.tolist()
    cache = FlexCache(load_model_config("Wan2.1-T2V-1.3B"), True)
    start_only = cache.resolve(CacheConfig("pab", PabParams(timestep_start=300.0)), ts, lambda t: 0).params
    end_only = cache.resolve(CacheConfig("pab", PabParams(timestep_end=990.0)), ts, lambda t: 0).params
    assert start_only.timestep_end <= 300.0 and end_only.timestep_start >= 990.0


def test_magcache_retention_sent_as_float32_retains_the_decimal_s_steps():
    import numpy as np

    from smartdiff.services.denoiser.cache.magcache import retained_steps

    for ratio, n, kept in ((0.7, 10, 7), (0.9, 10, 9), (0.35, 20, 7), (0.2, 50, 10), (0.0, 50, 0), (0.99, 50, 49)):
        assert retained_steps(float(np.float32(ratio)), n) == kept == retained_steps(ratio, n)
