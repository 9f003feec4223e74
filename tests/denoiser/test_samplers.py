"""Our flow-matching samplers against diffusers' schedulers (test-only oracle), configured as Wan's are."""

import numpy as np
import pytest
import torch

from smartdiff.services.denoiser.samplers import (
    SAMPLERS,
    FlowDPMSolverSampler,
    FlowEulerSampler,
    FlowUniPCSampler,
    make_sampler,
    shift_sigmas,
)
from smartdiff.shared.request import MIN_SHIFT

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices inside diffusers

STEPS = (1, 2, 3, 5, 20, 50, 100)
SHIFTS = (1.0, 3.0, 5.0, 12.0)
SHAPE = (1, 16, 3, 4, 4)  # [B, C, F, H, W]


def diffusers_scheduler(name: str, steps: int, shift: float):
    """diffusers' scheduler as the Wan Diffusers checkpoints (scheduler_config.json) configure it."""
    if name == "unipc":
        sched = diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
            final_sigmas_type="zero", timestep_spacing="linspace",
        )
    elif name == "dpm++":
        sched = diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero",
        )
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    # As WanPipeline does: without it, step() looks the index up by timestep value, which goes wrong when
    # integer timesteps repeat (e.g. 100 steps, shift 12: 999, 999, ...).
    sched.set_begin_index(0)
    return sched


def velocity(index: int) -> torch.Tensor:
    """The same pseudo-random 'model output' for both samplers at step `index`."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + index))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_matches_diffusers(name, steps, shift):
    ours = make_sampler(name, steps, shift)
    ref = diffusers_scheduler(name, steps, shift)
    assert ours.timesteps.dtype == torch.float32 and ours.timesteps.shape == (steps,)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == (steps + 1,)
    assert ours.sigmas[-1] == 0 and bool((ours.sigmas[1:] < ours.sigmas[:-1]).all())
    torch.testing.assert_close(ours.timesteps, ref.timesteps.to(torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.to(torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_trajectory_matches_diffusers(name, steps, shift):
    ours = make_sampler(name, steps, shift)
    ref = diffusers_scheduler(name, steps, shift)
    x_ours = x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):
        v = velocity(i)
        x_ours = ours.step(v, i, x_ours)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        assert x_ours.dtype == torch.float32
        assert rel_err(x_ours, x_ref) <= 1e-5, f"step {i}: rel err {rel_err(x_ours, x_ref):.2e}"


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps, shift", [(50, 5.0), (200, 2.0)])
def test_trajectory_within_float32_rounding_of_float64(name, steps, shift):
    """Against diffusers' update run in float64 (same float32 schedule), our error stays at float32 rounding.
    diffusers' own float32 run drifts to ~9e-6 at 200 steps (cancellation in UniC's b2 for small h)."""
    ours = make_sampler(name, steps, shift)
    ref = diffusers_scheduler(name, steps, shift)
    ref.sigmas = ref.sigmas.double()
    x_ours = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_ref = x_ours.double()
    for i, t in enumerate(ref.timesteps):
        v = velocity(i)
        x_ours = ours.step(v, i, x_ours)
        x_ref = ref.step(v.double(), t, x_ref, return_dict=False)[0]
        assert rel_err(x_ours, x_ref) <= 1e-6, f"step {i}: rel err {rel_err(x_ours, x_ref):.2e}"


def test_last_step_returns_data_prediction():
    """Every sampler ends at sigma = 0 on x0 = x - sigma v of its last model call (first-order final step)."""
    for name in SAMPLERS:
        s = make_sampler(name, 1, 5.0)
        x, v = torch.randn(SHAPE), torch.randn(SHAPE)
        torch.testing.assert_close(s.step(v, 0, x), x - s.sigmas[0] * v)


def test_instances_hold_independent_state():
    """Two interleaved requests give the same results as two sequential ones."""
    xs = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    alone = []
    for x in xs:
        s = make_sampler("unipc", 6, 5.0)
        for i in range(6):
            x = s.step(velocity(i) * (1 + len(alone)), i, x)
        alone.append(x)
    samplers = [make_sampler("unipc", 6, 5.0) for _ in xs]
    for i in range(6):
        for k, s in enumerate(samplers):
            xs[k] = s.step(velocity(i) * (1 + k), i, xs[k])
    for a, b in zip(alone, xs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_half_precision_inputs_are_upcast():
    s = make_sampler("dpm++", 3, 5.0)
    out = s.step(torch.randn(SHAPE).bfloat16(), 0, torch.randn(SHAPE).bfloat16())
    assert out.dtype == torch.float32


def test_step_out_of_order_is_rejected():
    s = make_sampler("unipc", 4, 5.0)
    s.step(velocity(0), 0, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="expects index 1"):
        s.step(velocity(0), 0, torch.randn(SHAPE))


def test_shift_sigmas():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)
    torch.testing.assert_close(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert shift_sigmas(0.5, 5.0) == pytest.approx(5 / 6)


def test_unipc_timesteps_near_wan_original():
    """Wan's FlowUniPCMultistepScheduler shifts linspace(1 - 1/T, 0, steps + 1)[:-1] (this formula reproduces
    its timesteps exactly); diffusers and we shift the same grid 1/T higher. The shift's slope (<= shift)
    turns that into timesteps lower in Wan by at most shift + 1 (truncation), equal at the first step."""
    for steps, shift in [(20, 1.0), (50, 5.0), (40, 12.0)]:
        wan = shift_sigmas(np.linspace(1 - 1 / 1000, 0, steps + 1)[:-1], shift)
        wan_timesteps = torch.from_numpy((wan * 1000).astype(np.int64)).float()
        diff = FlowUniPCSampler(steps, shift).timesteps - wan_timesteps
        assert diff[0] == 0 and diff.min() >= 0 and diff.max() <= shift + 1


def test_euler_applies_the_shift_twice_at_the_low_noise_end():
    s = FlowEulerSampler(10, 12.0)
    assert s.sigmas[0] == 1.0
    assert s.sigmas[-2].item() == pytest.approx(shift_sigmas(shift_sigmas(1e-3, 12.0), 12.0), rel=1e-5)


def test_registry():
    assert SAMPLERS == {"unipc": FlowUniPCSampler, "dpm++": FlowDPMSolverSampler, "euler": FlowEulerSampler}
    assert isinstance(make_sampler("unipc", 5, 5.0), FlowUniPCSampler)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="ddim", steps=5, shift=5.0), "sampler must be one of \\['dpm\\+\\+', 'euler', 'unipc'\\]"),
        (dict(name="unipc", steps=0, shift=5.0), "steps"),
        (dict(name="euler", steps=-3, shift=5.0), "steps"),
        (dict(name="unipc", steps=2.5, shift=5.0), "steps"),
        (dict(name="unipc", steps=5, shift=0.0), "shift"),
        (dict(name="dpm++", steps=5, shift=-1.0), "shift"),
        (dict(name="unipc", steps=5, shift=float("nan")), "shift"),
        (dict(name="unipc", steps=5, shift=5.0, num_train_timesteps=0), "num_train_timesteps"),
    ],
)
def test_make_sampler_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_sampler(**kwargs)


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("shift", [MIN_SHIFT, 100.0])
def test_every_sampler_stays_finite_at_the_shift_bounds_requests_allow(name, shift):
    """resolve_request accepts shift in [MIN_SHIFT, 100]; below it the schedule collapses onto sigma = 0
    (1e-12 gave NaN latents, 1e-300 a division by zero)."""
    steps = 50
    s = make_sampler(name, steps, shift)
    assert torch.isfinite(s.sigmas).all() and bool((s.sigmas[:-1] > s.sigmas[1:]).all())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 2, generator=g)
    for i in range(steps):
        x = s.step(torch.randn(1, 4, 2, 2, generator=g), i, x)
    assert torch.isfinite(x).all()


def test_the_request_rules_name_exactly_the_samplers_that_exist():
    from smartdiff.services.denoiser.samplers import SAMPLERS
    from smartdiff.shared.request import SAMPLER_NAMES

    assert sorted(SAMPLERS) == sorted(SAMPLER_NAMES)  # shared/ lists them without importing the engine
