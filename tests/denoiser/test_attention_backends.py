"""Attention backends: registry, request choices and their refusals, attach / detach, auto's selection, engine wiring.

Kernel numerics against float64 are in test_attention_kernels.py (Triton through its CPU interpreter).
"""

import dataclasses
import time

import pytest
import torch

from smartdiff.denoiser.v1 import options_pb2
from smartdiff.services.denoiser import attention as A
from smartdiff.services.denoiser.attention.auto import AutoKernel
from smartdiff.services.denoiser.attention.base import Kernel
from smartdiff.services.denoiser.dit import sdpa_attention
from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.denoiser.weights import random_dit
from smartdiff.shared.config import DiTConfig, load_model_config
from smartdiff.shared.errors import RequestError
from smartdiff.shared.request import GenerationRequest, resolve_request

CPU = torch.device("cpu")
TINY = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)  # head dim 16


def test_registry_lists_every_backend_with_constraints():
    names = A.backend_names()
    assert set(names) == {"sdpa", "flash_attn", "sage", "sage_fp8", "sage_int8", "sparge", "auto"}
    for name in names:
        info = A.get_backend(name).info
        assert info.name == name and info.description and info.dtypes and info.devices
    assert not A.get_backend("sdpa").info.lossy and not A.get_backend("flash_attn").info.lossy
    assert all(A.get_backend(n).info.lossy for n in ("sage", "sage_fp8", "sage_int8", "sparge"))
    status = {s.info.name: s for s in A.available_backends(CPU, torch.float32, 16)}
    assert status["sdpa"].available and status["auto"].available
    assert "CUDA" in status["flash_attn"].reason
    assert "head dim 64, 128, not 16" in status["sage"].reason


def test_importing_the_registry_imports_no_kernel():
    import sys

    import smartdiff.services.denoiser.attention  # noqa: F401

    A.available_backends(CPU)
    assert "smartdiff.services.denoiser.attention.triton_sage" not in sys.modules or "triton" in sys.modules
    assert "flash_attn" not in sys.modules and "sageattention" not in sys.modules


@pytest.mark.parametrize("kwargs,field", [
    (dict(backend="magic"), "attention.backend"),
    (dict(backend="auto", tolerance=0.0), "attention.auto.tolerance"),
    (dict(backend="auto", tolerance=float("nan")), "attention.auto.tolerance"),
    (dict(backend="auto", candidates=("auto",)), "attention.auto.candidates"),
    (dict(backend="auto", candidates=("sage", "sage")), "attention.auto.candidates"),
])
def test_bad_choices_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(RequestError) as e:
        A.AttentionChoice(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("kwargs,field", [
    (dict(topk=0.0), "attention.sparge.topk"), (dict(topk=1.5), "attention.sparge.topk"),
    (dict(cdf_threshold=-0.1), "attention.sparge.cdf_threshold"),
    (dict(sim_threshold=1.5), "attention.sparge.sim_threshold"),
    (dict(pv_threshold=0.0), "attention.sparge.pv_threshold"),
])
def test_bad_sparge_params_are_refused(kwargs, field):
    with pytest.raises(RequestError) as e:
        A.SpargeParams(**kwargs)
    assert e.value.field == field


def test_sparge_defaults_follow_the_mode():
    assert A.SpargeParams().resolved() == A.SpargeParams(cdf_threshold=0.98, sim_threshold=0.6)
    assert A.SpargeParams(topk=0.5).resolved() == A.SpargeParams(topk=0.5, sim_threshold=-0.1)
    assert A.SpargeParams(topk=0.5, cdf_threshold=0.9).resolved().cdf_threshold is None  # topk wins


def test_choice_from_proto_takes_unset_fields_as_defaults():
    msg = options_pb2.AttentionConfig()
    assert A.AttentionChoice.from_proto(msg) == A.AttentionChoice()
    assert A.AttentionChoice.from_proto(msg, default_backend="sage").backend == "sage"
    msg = options_pb2.AttentionConfig(backend="auto", allow_fallback=True,
                                      auto=options_pb2.AutoAttentionParams(tolerance=0.05, candidates=["sage"]),
                                      sparge=options_pb2.SpargeAttentionParams(topk=0.25))
    c = A.AttentionChoice.from_proto(msg)
    assert (c.backend, c.allow_fallback, c.candidates, c.sparge.topk) == ("auto", True, ("sage",), 0.25)
    assert c.tolerance == pytest.approx(0.05) and c.sparge.cdf_threshold is None
    with pytest.raises(RequestError):
        A.AttentionChoice.from_proto(options_pb2.AttentionConfig(
            backend="sparge", sparge=options_pb2.SpargeAttentionParams(topk=2.0)))


def test_backend_that_cannot_run_is_refused_with_why_and_what_is_available():
    with pytest.raises(RequestError) as e:
        A.resolve(A.AttentionChoice("flash_attn"), CPU, torch.float32, 64)
    msg = str(e.value)
    assert e.value.field == "attention.backend"
    assert "needs a CUDA device" in msg and "available here:" in msg and "sdpa" in msg and "allow_fallback" in msg
    with pytest.raises(RequestError, match="supports head dim 64, 128, not 16"):
        A.resolve(A.AttentionChoice("sage"), CPU, torch.float32, 16)
    with pytest.raises(RequestError, match="not allowed by this deployment"):
        A.resolve(A.AttentionChoice("sparge"), CPU, torch.float32, 64, allowed={"sdpa", "sage"})


def test_fallback_only_when_asked():
    res = A.resolve(A.AttentionChoice("flash_attn", allow_fallback=True), CPU, torch.float32, 64)
    assert res.backend == "sdpa" and res.note.startswith("fallback from flash_attn: needs a CUDA device")


def tiny_dit(cfg: DiTConfig = TINY, seed: int = 0):
    return random_dit(cfg, "cpu", torch.float32, seed).eval()


def forward(dit, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 512, dit.cfg.text_dim, generator=g)
    with torch.no_grad():
        return dit(x, torch.tensor([700.0]), ctx)


def test_attach_sets_self_attention_only_and_detach_restores():
    dit = tiny_dit()
    ref = forward(dit)
    with A.attach(dit, A.AttentionChoice("sdpa")) as h:
        fns = {b.self_attn.attention_fn for b in dit.blocks}
        assert sdpa_attention not in fns
        assert all(b.cross_attn.attention_fn is sdpa_attention for b in dit.blocks)  # cross-attention stays exact
        out = forward(dit)
    assert torch.equal(out, ref)
    assert all(b.self_attn.attention_fn is sdpa_attention for b in dit.blocks)
    assert h.kernel is None  # the request's state is gone
    assert h.report() == A.AttentionReport(backend="sdpa", kernel="sdpa[cpu]", selection="sdpa[cpu]")


def test_detach_restores_even_when_the_request_fails():
    dit = tiny_dit()
    with pytest.raises(ZeroDivisionError):
        with A.attach(dit, A.AttentionChoice("auto")):
            1 / 0
    assert all(b.self_attn.attention_fn is sdpa_attention for b in dit.blocks)


def test_two_requests_on_two_dits_do_not_share_state():
    d1, d2 = tiny_dit(seed=0), tiny_dit(seed=1)
    h1 = A.attach(d1, A.AttentionChoice("auto"))
    h2 = A.attach(d2, A.AttentionChoice("sdpa"))
    assert h1.kernel is not h2.kernel
    assert not ({b.self_attn.attention_fn for b in d1.blocks} & {b.self_attn.attention_fn for b in d2.blocks})
    forward(d1), forward(d2)
    h2.detach()
    assert all(b.self_attn.attention_fn is sdpa_attention for b in d2.blocks)
    assert all(b.self_attn.attention_fn is not sdpa_attention for b in d1.blocks)  # h1 untouched
    h1.detach()


def test_fallback_report_says_what_ran_and_why():
    dit = tiny_dit()
    with A.attach(dit, A.AttentionChoice("sage", allow_fallback=True)) as h:
        forward(dit)
    r = h.report()
    assert r.backend == "sdpa" and r.kernel == "sdpa[cpu]"
    assert r.selection == "sdpa[cpu] (fallback from sage: supports head dim 64, 128, not 16)"


def test_wrap_installs_around_each_layer():
    dit = tiny_dit()
    calls = []

    def wrap(fn):
        def wrapped(q, k, v):
            calls.append(q.shape)
            return fn(q, k, v)
        return wrapped

    with A.attach(dit, wrap=wrap):
        forward(dit)
    assert len(calls) == TINY.num_layers


class FakeKernel(Kernel):
    """exact output * (1 + err), after sleeping `delay` seconds (CPU timings)."""

    def __init__(self, name, err, delay):
        self.name, self.label, self.err, self.delay, self.calls = name, f"{name}[fake]", err, delay, 0

    def __call__(self, q, k, v):
        self.calls += 1
        time.sleep(self.delay)
        return sdpa_attention(q, k, v) * (1 + self.err)


def run_auto(auto: AutoKernel, layers: int = 3, forwards: int = 2):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
    outs = []
    for _ in range(forwards):
        for layer in range(layers):
            outs.append(auto.for_layer(layer)(q, k, v))
    return outs, sdpa_attention(q, k, v)


def test_auto_picks_the_fastest_candidate_within_tolerance():
    exact = FakeKernel("sdpa", 0.0, 0.03)
    fast_bad = FakeKernel("sparge", 0.05, 0.0)  # fastest, but 5e-2 off
    ok = FakeKernel("sage", 0.01, 0.01)
    auto = AutoKernel(exact, [(fast_bad, True), (ok, True)], tolerance=2e-2, skipped=[("flash_attn", "no GPU")])
    outs, ref = run_auto(auto)
    assert all(torch.equal(o, ref) for o in outs[:3])  # the measuring forward returns the exact output
    assert auto.chosen is ok
    assert torch.allclose(outs[3], ref * 1.01)
    text = auto.describe()
    assert text.startswith("auto->sage[fake] (rel err 1.0e-02 <= tol 2.0e-02")
    assert "sparge[fake]: rel err 5.0e-02 > tol" in text and "flash_attn: unavailable (no GPU)" in text
    assert fast_bad.calls == 1 + 3 and ok.calls == 1 + 3 + 3  # warm-up + 3 measured (+ 3 chosen)


def test_auto_never_picks_a_lossy_backend_that_fails_and_takes_exact_ones_by_speed():
    exact = FakeKernel("sdpa", 0.0, 0.03)
    auto = AutoKernel(exact, [(FakeKernel("sage", 0.03, 0.0), True)], tolerance=2e-2, skipped=[])
    run_auto(auto)
    assert auto.chosen is exact and auto.name == "sdpa"
    flash = FakeKernel("flash_attn", 0.03, 0.0)  # exact backends need not pass (bf16 rounding differs)
    auto = AutoKernel(FakeKernel("sdpa", 0.0, 0.03), [(flash, False)], tolerance=2e-2, skipped=[])
    run_auto(auto)
    assert auto.chosen is flash and auto.describe().startswith("auto->flash_attn[fake] (exact, ")


def test_auto_decides_on_report_if_only_one_forward_ran():
    exact = FakeKernel("sdpa", 0.0, 0.0)
    auto = AutoKernel(exact, [(FakeKernel("sage", 0.0, 0.03), True)], tolerance=2e-2, skipped=[])
    run_auto(auto, forwards=1)
    assert auto.chosen is None
    assert auto.describe().startswith("auto->sdpa[fake] (exact kernel fastest")


def test_auto_candidates_unavailable_here_are_listed_not_run():
    res = A.resolve(A.AttentionChoice("auto", candidates=("flash_attn", "sage")), CPU, torch.float32, 16)
    assert res.candidates == ()
    assert dict(res.skipped)["flash_attn"].startswith("needs a CUDA device")
    dit = tiny_dit()
    with A.attach(dit, A.AttentionChoice("auto", candidates=("flash_attn", "sage"))) as h:
        ref = forward(dit)
        assert torch.equal(forward(dit), ref)
    assert h.report().backend == "sdpa"
    assert "sage: unavailable (supports head dim 64, 128, not 16)" in h.selection


def tiny_engine(dim: int = 32, heads: int = 2):
    model = load_model_config("wan-tiny")
    model = dataclasses.replace(model, dit=dataclasses.replace(model.dit, dim=dim, num_heads=heads))
    return DenoiserEngine.load(model, None, "cpu", torch.float32), model


def test_engine_denoise_reports_the_attention_that_ran():
    engine, model = tiny_engine()
    req = resolve_request(GenerationRequest(prompt="p", width=32, height=32, frames=1, steps=2, seed=3), model)
    emb = torch.randn(5, model.dit.text_dim)
    base = engine.denoise(req, emb, emb)
    reports = []
    out = engine.denoise(req, emb, emb, attention=A.AttentionChoice("auto"), on_attention=reports.append)
    assert torch.equal(out, base)  # on CPU auto keeps the exact kernel (head dim 16: no lossy candidate)
    assert len(reports) == 1 and reports[0].backend == "sdpa" and reports[0].selection.startswith("auto->sdpa[cpu]")
    assert all(b.self_attn.attention_fn is sdpa_attention for d in engine.experts for b in d.blocks)
    with pytest.raises(RequestError, match="attention.backend"):
        engine.denoise(req, emb, emb, attention=A.AttentionChoice("flash_attn"))
    assert all(b.self_attn.attention_fn is sdpa_attention for d in engine.experts for b in d.blocks)


def test_warm_kernels_runs_each_allowed_backend_once(monkeypatch):
    """Warm-up compiles the JIT kernels of the backends the deployment allows (flash_attn included: it runs our
    kernel on Hopper); sdpa (library kernels) and auto are not called, nor what cannot run here."""
    from smartdiff.services.denoiser.attention import handle
    from smartdiff.services.denoiser.attention.base import BackendStatus

    calls = []

    class Fake(Kernel):
        def __init__(self, name):
            self.name = self.label = name

        def __call__(self, q, k, v):
            calls.append((self.name, tuple(q.shape)))
            return q

    statuses = [BackendStatus(A.get_backend(n).info, None if n != "sage_fp8" else "needs compute capability 8.9")
                for n in A.backend_names()]
    monkeypatch.setattr(A, "available_backends", lambda device, dtype, head_dim: statuses)
    monkeypatch.setattr(handle, "get_backend", lambda name: type("B", (), {
        "build": staticmethod(lambda choice, device, dtype, head_dim: Fake(name))}))
    warmed = ["flash_attn", "sage", "sage_int8", "sparge"]
    assert sorted(handle.warm_kernels(CPU, torch.float32, 16, 3, 50)) == warmed
    assert sorted(calls) == [(n, (1, 50, 3, 16)) for n in warmed]
    calls.clear()
    assert handle.warm_kernels(CPU, torch.float32, 16, 3, 50, allowed=("sdpa", "sage_int8", "auto")) == ["sage_int8"]
    assert handle.warm_kernels(CPU, torch.float32, 16, 3, 50, allowed=("sdpa",)) == []


def test_denoiser_warms_attention_only_on_cuda_and_not_under_ring(monkeypatch):
    from smartdiff.services.denoiser import server
    from smartdiff.services.denoiser.attention import handle

    seen = []
    monkeypatch.setattr(handle, "warm_kernels", lambda *args: seen.append(args) or [])
    model = load_model_config("Wan2.1-T2V-1.3B")
    server.warm_attention(model, server.DenoiserOptions(), CPU, torch.float32)
    server.warm_attention(model, server.DenoiserOptions(ring_degree=2), torch.device("cuda"), torch.bfloat16)
    assert seen == []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    server.warm_attention(model, server.DenoiserOptions(ulysses_degree=2, attention_backends=("sage",)),
                          torch.device("cuda"), torch.bfloat16)
    # 480p x 81 frames: 21 x 30 x 52 patches; 12 heads over 2 Ulysses ranks
    assert seen == [(torch.device("cuda"), torch.bfloat16, 128, 6, 32760, ("sage",))]


def test_requests_that_name_no_backend_get_the_fastest_exact_one_of_the_deployment():
    """flash_attn on a CUDA engine in a 16-bit dtype where it is allowed (it runs our Hopper kernel there), sdpa
    on the CPU, in float32, without an engine, or when the deployment does not allow flash_attn; an explicit
    --default-attention wins. Every rank computes the same (same device type, dtype and options)."""
    from types import SimpleNamespace

    from smartdiff.services.denoiser import server

    model = load_model_config("Wan2.1-T2V-1.3B")
    gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    opts = server.DenoiserOptions()
    assert server.default_attention(opts, model, gpu) == "flash_attn"
    assert server.default_attention(opts, model, SimpleNamespace(device=CPU, dtype=torch.bfloat16)) == "sdpa"
    assert server.default_attention(opts, model, SimpleNamespace(device=gpu.device, dtype=torch.float32)) == "sdpa"
    assert server.default_attention(opts, model) == "sdpa"
    assert server.default_attention(server.DenoiserOptions(attention_backends=("sage",)), model, gpu) == "sdpa"
    assert server.default_attention(server.DenoiserOptions(default_attention="sage"), model, gpu) == "sage"
    args = server.argparse.ArgumentParser()
    server.add_denoiser_flags(args)
    assert server.options_from_args(args.parse_args([])).default_attention is None


def test_flash_attn_without_our_kernel_gives_the_exact_log_sum_exp_for_ring_attention():
    from smartdiff.services.denoiser.attention import flash

    assert flash.INFO.returns_lse
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
    out, lse = flash.FallbackKernel(CPU).with_lse(q, k, v)
    scores = q.transpose(1, 2) @ k.transpose(1, 2).mT / 4
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out, (torch.softmax(scores, -1) @ v.transpose(1, 2)).transpose(1, 2), atol=1e-5)


def test_a_deployment_s_attention_flags_are_checked_before_it_serves():
    """ConfigError naming the flag: an unknown name in --attention-backends, a --default-attention that cannot
    run here (or is not allowed); a default that runs passes."""
    from smartdiff.services.denoiser import server
    from smartdiff.shared.config import ConfigError

    engine, model = tiny_engine()

    def check(**options):
        server.check_options(server.DenoiserOptions(**options), model, engine.device, engine.dtype)

    with pytest.raises(ConfigError, match="--attention-backends: unknown backend 'bogus'"):
        check(attention_backends=("sdpa", "bogus"))
    with pytest.raises(ConfigError, match="--default-attention sage: attention.backend: .*cannot run"):
        check(default_attention="sage")
    with pytest.raises(ConfigError, match="--default-attention sparge: .*not allowed"):
        check(attention_backends=("sdpa",), default_attention="sparge")
    check(default_attention="sdpa")
    check(attention_backends=("sdpa", "sage"))


def test_auto_candidates_the_deployment_does_not_allow_are_refused_not_dropped():
    from smartdiff.denoiser.v1 import denoiser_pb2
    from smartdiff.services.denoiser import server

    engine, model = tiny_engine()
    params = denoiser_pb2.DenoiseParams(steps=1, guidance=[1.0], seed=0)
    params.attention.backend = "auto"
    params.attention.auto.candidates.append("sage")
    with pytest.raises(RequestError, match="attention.auto.candidates: 'sage' not allowed by this deployment"):
        server.prepare_job(params, model, server.DenoiserOptions(attention_backends=("sparge", "auto")), engine)


@pytest.mark.parametrize("backend", ["sage", "auto", "flash_attn"])
def test_a_backend_the_deployment_does_not_allow_falls_back_only_when_asked(backend):
    """As for a backend that cannot run on the device: refused naming what is allowed, or, with allow_fallback,
    the exact backend runs and the reason goes into the job's note (the summary's attention_selection)."""
    from smartdiff.denoiser.v1 import denoiser_pb2
    from smartdiff.services.denoiser import server

    engine, model = tiny_engine()
    only_exact = server.DenoiserOptions(attention_backends=("sdpa",))
    params = denoiser_pb2.DenoiseParams(steps=1, guidance=[1.0], seed=0)
    params.attention.backend = backend
    with pytest.raises(RequestError, match=f"'{backend}' is not allowed by this deployment; allowed: sdpa "
                                           r"\(or set allow_fallback"):
        server.prepare_job(params, model, only_exact, engine)
    params.attention.allow_fallback = True
    job = server.prepare_job(params, model, only_exact, engine)
    assert job.attention.backend == A.EXACT
    assert job.attention_note == f"fallback from {backend}: not allowed by this deployment"
    # `auto` allowed but none of its candidates: the exact backend, said so
    params = denoiser_pb2.DenoiseParams(steps=1, guidance=[1.0], seed=0)
    params.attention.backend = "auto"
    job = server.prepare_job(params, model, server.DenoiserOptions(attention_backends=("auto",)), engine)
    assert job.attention.backend == A.EXACT and job.attention_note == "auto: no candidate allowed by this deployment"


def test_effective_attention_reports_only_the_parameters_that_applied():
    """Parameters of a backend that did not run are not reported as applied; those that did, with defaults."""
    from smartdiff.denoiser.v1 import denoiser_pb2
    from smartdiff.services.denoiser import server
    from smartdiff.services.denoiser.attention.handle import AttentionReport

    engine, model = tiny_engine()

    def effective(ran: str, **attention):
        params = denoiser_pb2.DenoiseParams(steps=1, guidance=[1.0], seed=0)
        params.attention.CopyFrom(options_pb2.AttentionConfig(**attention))
        job = server.prepare_job(params, model, server.DenoiserOptions())
        result = server.JobResult(latents=None, attention=AttentionReport(ran, f"{ran}[x]", f"{ran}[x]"))
        return server.effective_attention(job, result)

    sparge = options_pb2.SpargeAttentionParams(topk=0.5)
    e = effective("sdpa", backend="sdpa", sparge=sparge, auto=options_pb2.AutoAttentionParams(tolerance=0.1))
    assert e.backend == "sdpa" and not e.HasField("sparge") and not e.HasField("auto")
    e = effective("sparge", backend="sparge", sparge=sparge)
    assert e.sparge.topk == 0.5 and e.sparge.sim_threshold == pytest.approx(-0.1)  # the top-k default
    assert not e.sparge.HasField("cdf_threshold")  # not used in top-k mode
    e = effective("sage", backend="auto", sparge=sparge, auto=options_pb2.AutoAttentionParams(candidates=["sage"]))
    assert e.backend == "sage" and not e.HasField("sparge")
    assert e.auto.tolerance == pytest.approx(2e-2) and list(e.auto.candidates) == ["sage"]


def test_ring_attention_refuses_backends_without_log_sum_exp_before_any_work():
    """Under ring attention `auto` (no log-sum-exp) is refused naming the ones that can, or falls back to the
    exact backend when the request allows it; a --default-attention that cannot is a ConfigError."""
    from smartdiff.denoiser.v1 import denoiser_pb2
    from smartdiff.services.denoiser import server
    from smartdiff.shared.config import ConfigError

    engine, model = tiny_engine()
    ring = server.DenoiserOptions(ring_degree=2)
    params = denoiser_pb2.DenoiseParams(steps=1, guidance=[1.0], seed=0)
    params.attention.backend = "auto"
    with pytest.raises(RequestError, match="'auto' cannot run under ring attention.*allow_fallback"):
        server.prepare_job(params, model, ring, engine)
    params.attention.allow_fallback = True
    job = server.prepare_job(params, model, ring, engine)
    assert job.attention.backend == A.EXACT and "fallback from auto: " in job.attention_note
    with pytest.raises(ConfigError, match="--default-attention auto: .*ring attention"):
        server.check_options(server.DenoiserOptions(ring_degree=2, default_attention="auto"), model, engine.device,
                             engine.dtype)
