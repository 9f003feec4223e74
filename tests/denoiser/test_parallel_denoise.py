"""The denoiser on 2 and 4 gloo processes (cfg, Ulysses, ring and their products) gives the single-process latents."""

import pytest
import torch

from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.parallel import ParallelConfig, ParallelState
from smartdiff.shared.config import load_model_config
from smartdiff.shared.request import GenerationRequest, resolve_request
from distributed_helpers import run_ranks
from triton_interpreter import require_interpreter

# 48 x 48 pixels x 9 frames -> 3 x 3 x 3 = 27 tokens: no layout divides it, so every layout pads.
SHAPE = dict(width=48, height=48, frames=9, steps=3, seed=7)


def inputs(model_name):
    model = load_model_config(model_name)
    g = torch.Generator().manual_seed(0)
    ctx, neg = torch.randn(9, model.dit.text_dim, generator=g), torch.randn(4, model.dit.text_dim, generator=g)
    req = resolve_request(GenerationRequest(prompt="x", guidance=model.defaults.guidance, **SHAPE), model)
    return model, req, ctx, neg


def denoise(model_name, layout=None, rank=0):
    model, req, ctx, neg = inputs(model_name)
    state = ParallelState(ParallelConfig(*layout), rank) if layout else None
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=state)
    return engine.denoise(req, ctx, neg)


def _rank(rank, world, model_name, layout):
    return denoise(model_name, layout, rank)


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2)],
                         ids=["cfg2", "ulysses2", "ring2", "cfg2xulysses2", "ulysses2xring2"])
def test_layouts_match_single_process(layout):
    expected = denoise("wan-tiny")
    results = run_ranks(_rank, ParallelConfig(*layout).world_size, "wan-tiny", layout)
    for latents in results:  # every rank holds the same latents
        assert ((latents - expected).norm() / expected.norm()) <= 1e-5


def test_two_expert_model_under_cfg_and_ring():
    expected = denoise("wan-tiny-moe")
    for latents in run_ranks(_rank, 4, "wan-tiny-moe", (2, 1, 2)):
        assert ((latents - expected).norm() / expected.norm()) <= 1e-5


def _cached_rank(rank, world, layout, strategy):
    from smartdiff.services.denoiser.cache import BudgetParams, CacheConfig, CacheStats, PabParams, TeaCacheParams

    model, req, ctx, neg = inputs("wan-tiny")
    req = resolve_request(GenerationRequest(prompt="x", guidance=(5.0,), **{**SHAPE, "steps": 10}), model)
    params = {"teacache": TeaCacheParams(rel_l1_threshold=5.0), "pab": PabParams(),
              "budget": BudgetParams(compute_fraction=0.5)}[strategy]
    state = ParallelState(ParallelConfig(*layout), rank) if layout else None
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=state, enable_flexcache=True)
    stats = CacheStats()
    latents = engine.denoise(req, ctx, neg, cache=CacheConfig(strategy, params), cache_stats=stats)
    return latents, stats.cached_steps, stats.to_proto().SerializeToString()


@pytest.mark.parametrize("strategy", ["teacache", "pab", "budget"])
def test_cache_decisions_are_the_same_on_every_rank(strategy):
    """Under sequence parallel every rank takes the single-process decisions and caches its own shard."""
    latents, cached, report = _cached_rank(0, 1, None, strategy)
    results = run_ranks(_cached_rank, 2, (1, 2, 1), strategy)
    assert cached > 0 or strategy == "pab"
    for got, got_cached, got_report in results:
        assert got_cached == cached and got_report == report
        assert ((got - latents).norm() / latents.norm()) <= 1e-5


def _cancel_rank(rank, world, cancel_after, layout, between_blocks):
    """Rank 0's client cancels once `cancel_after` blocks ran here; returns (steps done, blocks run, message)."""
    from smartdiff.services.denoiser.distributed import LockstepStop
    from smartdiff.shared.errors import Cancelled

    model, req, ctx, neg = inputs("wan-tiny")
    req = resolve_request(GenerationRequest(prompt="x", guidance=(5.0,), **{**SHAPE, "steps": 20}), model)
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=ParallelState(ParallelConfig(*layout), rank))
    done, blocks = [], []
    for block in engine.experts[0].blocks:
        block.register_forward_pre_hook(lambda *_: blocks.append(1))
    local = (lambda: len(blocks) >= cancel_after) if rank == 0 else None  # only rank 0 knows the client cancelled
    stop = LockstepStop(torch.device("cpu"), local)
    try:
        engine.denoise(req, ctx, neg, progress=lambda i, *_: done.append(i), cancelled=stop,
                       interrupt=stop if between_blocks else None)
    except Cancelled as e:
        return len(done), len(blocks), str(e)
    return None


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1)], ids=["cfg", "ulysses"])
@pytest.mark.parametrize("between_blocks", [False, True], ids=["per-step", "per-block"])
def test_cancel_on_rank_zero_stops_every_rank_at_the_same_point(layout, between_blocks):
    """Every rank stops at the same step (per-step checks: a multi-GPU pod before interrupt was passed) or at the
    same block of the same step (the pod now), a check after rank 0 saw the cancel."""
    per_step = 2  # wan-tiny: 2 blocks per forward, one forward per rank and step under CFG or Ulysses parallel
    results = run_ranks(_cancel_rank, 2, 3 * per_step, layout, between_blocks)
    assert results[0] is not None and results[0] == results[1], results  # same step, block and message
    # Rank 0 sees the cancel at the check before step 4 (6 blocks ran); every rank acts on it at the next check:
    # between step 4's two blocks, or (per-step checks only) before step 5.
    if between_blocks:
        assert results[0] == (3, 7, "cancelled during step 4/20"), results
    else:
        assert results[0] == (4, 8, "cancelled before step 5/20"), results


def _diverging_cache_rank(rank, world, stop_checks):
    """CFG-parallel ranks whose MagCache decides apart (cond ratios 1: reuse whenever allowed; uncond 0.5: never),
    with the service's lockstep stop checks (never firing) or none. Returns (latents, cached steps)."""
    from smartdiff.services.denoiser.cache import CacheCalibration, CacheConfig, CacheStats, MagCacheParams
    from smartdiff.services.denoiser.distributed import LockstepStop

    model, req, ctx, neg = inputs("wan-tiny")
    steps = 10
    req = resolve_request(GenerationRequest(prompt="x", guidance=(5.0,), **{**SHAPE, "steps": steps}), model)
    calibration = CacheCalibration("wan-tiny", steps, (), ((1.0,) * steps, (0.5,) * steps))
    state = ParallelState(ParallelConfig(2, 1, 1), rank) if world > 1 else None
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=state, enable_flexcache=True,
                                 cache_calibration=calibration)
    stop = LockstepStop(torch.device("cpu"), (lambda: False) if rank == 0 else None) if stop_checks else None
    stats = CacheStats()
    latents = engine.denoise(req, ctx, neg, cache=CacheConfig("magcache", MagCacheParams(0.5, 3, 0.1)),
                             cache_stats=stats, cancelled=stop, interrupt=stop)
    return latents, stats.cached_steps


def test_lockstep_stop_checks_survive_cfg_ranks_whose_caches_decide_apart():
    """One CFG rank replays the block stack from its cache while the other runs it: both still make the same
    stop checks (a broadcast each), so the job ends, with the latents of the run without checks."""
    plain = run_ranks(_diverging_cache_rank, 2, False)
    checked = run_ranks(_diverging_cache_rank, 2, True)
    assert plain[0][1] > 0  # the cond branch reused steps; the uncond one did not
    for (want, _), (got, _) in zip(plain, checked):
        assert torch.equal(got, want)


def _lossy_rank(rank, world, backend, layout):
    """wan-tiny with head dim 64 (what our Triton kernels take), on `layout` or one process, with `backend`."""
    import dataclasses

    from smartdiff.services.denoiser.attention import AttentionChoice

    model, req, ctx, neg = inputs("wan-tiny")
    model = dataclasses.replace(model, dit=dataclasses.replace(model.dit, dim=128, num_heads=2))
    state = ParallelState(ParallelConfig(*layout), rank) if layout else None
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=state)
    req = resolve_request(GenerationRequest(prompt="x", guidance=(5.0,), **{**SHAPE, "steps": 2}), model)
    return engine.denoise(req, ctx, neg, attention=AttentionChoice(backend=backend) if backend else None)


@pytest.mark.parametrize("backend", ["sage", "sparge"])
def test_ring_attention_with_lossy_backends_that_return_the_lse(backend, monkeypatch):
    """sage / sparge under ring attention: their kernels give the log-sum-exp; the result stays within the
    lossy backends' tolerance of the exact single-process run (their quantisation / block choices are per ring
    block, so not bit-equal to their own single-process run)."""
    pytest.importorskip("triton", reason="sage / sparge are Triton kernels (CPU: TRITON_INTERPRET=1)")
    require_interpreter()  # the ranks run on the CPU even where there is a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks inherit it
    exact = _lossy_rank(0, 1, None, None)
    for latents in run_ranks(_lossy_rank, 2, backend, (1, 1, 2)):
        assert ((latents - exact).norm() / exact.norm()) <= 2e-2


def test_ring_refuses_backends_without_lse():
    for field, message in run_ranks(_refuse_rank, 2):  # every rank refuses, before any collective
        assert field == "attention.backend"
        assert "cannot run under ring attention" in message and "sage" in message


def _refuse_rank(rank, world):
    from smartdiff.services.denoiser.attention import AttentionChoice
    from smartdiff.shared.errors import RequestError

    model, req, ctx, neg = inputs("wan-tiny")
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32,
                                 parallel=ParallelState(ParallelConfig(1, 1, 2), rank))
    try:
        engine.denoise(req, ctx, neg, attention=AttentionChoice(backend="auto"))
    except RequestError as e:
        return e.field, str(e)
    return None, ""


def _unguided_counts_rank(rank, world, model_name, guidance):
    from smartdiff.services.denoiser.cache import CacheConfig, MagCacheParams
    from smartdiff.services.denoiser.distributed import sum_cache_counts
    from smartdiff.services.denoiser.server import JobResult

    model = load_model_config(model_name)
    g = torch.Generator().manual_seed(0)
    ctx, neg = torch.randn(9, model.dit.text_dim, generator=g), torch.randn(4, model.dit.text_dim, generator=g)
    req = resolve_request(GenerationRequest(prompt="x", guidance=guidance, width=32, height=32, frames=5, steps=8,
                                            seed=3), model)
    state = ParallelState(ParallelConfig(2, 1, 1), rank) if world > 1 else None
    engine = DenoiserEngine.load(model, None, "cpu", torch.float32, parallel=state, enable_flexcache=True)
    result = JobResult(latents=None)
    result.latents = engine.denoise(req, ctx, neg if req.uses_cfg else None, cache_stats=result.cache,
                                    cache=CacheConfig("magcache", MagCacheParams(threshold=1.0, max_skip_steps=2)))
    sum_cache_counts(engine, result, "cpu", req)
    return tuple({k: n for k, n in counts.items() if n} for counts in (result.cache.computed, result.cache.reused))


@pytest.mark.parametrize("model_name,guidance", [("wan-tiny", (1.0,)), ("wan-tiny-moe", (4.0, 1.0))])
def test_cfg_parallel_counts_a_step_without_guidance_once(model_name, guidance):
    """Both CFG ranks run the conditional branch of a step whose guidance is 1: the summary counts it once, as
    one process does (it counted it twice)."""
    single = _unguided_counts_rank(0, 1, model_name, guidance)
    for counts in run_ranks(_unguided_counts_rank, 2, model_name, guidance):
        assert counts == single and sum(single[1].values()) > 0
