"""Flow-matching samplers for the Wan denoising loop (UniPC, DPM-Solver++, Euler), a registry keyed by name.

Flow matching with Wan's schedule: x_sigma = (1 - sigma) * x0 + sigma * noise, and the DiT predicts the
velocity v = noise - x0, so one model call gives the data prediction x0 = x - sigma * v. Multistep solvers
work in the half log-SNR lambda = log(alpha / sigma) with alpha = 1 - sigma.

Every sampler reproduces the matching diffusers scheduler configured as the published Wan Diffusers
checkpoints configure it (tests/denoiser/test_samplers.py compares schedules and whole trajectories):
the schedules are built in float64 numpy (or float32 torch for Euler's training grid) in the same order of
operations as diffusers, so that the integer truncation of the timesteps lands on the same side; the
per-step coefficients are Python floats (float64) computed from the float32 sigmas, which is at least as
accurate as diffusers' float32 0-d tensors and needs no device round trip.

One sampler instance holds the multistep history of ONE request: make a new one per request.
"""

from __future__ import annotations

import math
import numbers
from typing import Protocol, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor, float)


class Sampler(Protocol):
    """One request's sampler: call `step` with index 0, 1, ..., steps - 1 in order."""

    name: str
    timesteps: torch.Tensor  # [steps] float32, sigma * num_train_timesteps as passed to the DiT, descending
    sigmas: torch.Tensor  # [steps + 1] float32, descending, ending at 0

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Velocity prediction at `sigmas[index]` -> sample at `sigmas[index + 1]` (float32)."""
        ...


def shift_sigmas(sigmas: ArrayT, shift: float) -> ArrayT:
    """Wan's timestep shift sigma' = shift * sigma / (1 + (shift - 1) * sigma); shift > 1 spends more steps
    at high noise. Keeps 0 and 1 fixed; works elementwise on floats, numpy arrays and tensors (same dtype)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_schedule_args(steps: int, shift: float, num_train_timesteps: int) -> None:
    def is_int(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    is_real = isinstance(shift, numbers.Real) and not isinstance(shift, bool)
    if not (is_real and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if not is_int(num_train_timesteps) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma = 0 (clean), -inf at sigma = 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _with_final_zero(sigmas: np.ndarray) -> torch.Tensor:
    """[steps] float64 -> [steps + 1] float32 ending at 0 (diffusers' final_sigmas_type="zero")."""
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def _integer_timesteps(sigmas: np.ndarray, num_train_timesteps: int) -> torch.Tensor:
    """diffusers' multistep schedulers truncate sigma * T to int64 (toward zero, not rounded); the DiT
    receives those integers, here as float32 so every sampler has the same dtype."""
    return torch.from_numpy((sigmas * num_train_timesteps).astype(np.int64)).to(torch.float32)


class _FlowSampler:
    """Shared state: the schedule, its half log-SNRs and the index of the next expected step."""

    name: str

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.sigmas = sigmas  # [steps + 1] float32
        self.timesteps = timesteps  # [steps] float32
        self.num_steps = len(timesteps)
        self._sigma = [float(s) for s in sigmas]  # float32 values as Python floats, for the coefficients
        self._lambda = [_half_log_snr(s) for s in self._sigma]
        self._next_index = 0

    def _begin_step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor):
        """Checks the call order; returns (sample, velocity) upcast to float32."""
        if index != self._next_index:
            raise ValueError(
                f"{type(self).__name__}.step expects index {self._next_index} next (0..{self.num_steps - 1},"
                f" in order, one instance per request), got {index}"
            )
        self._next_index += 1
        return sample.float(), model_output.float()

    def _x0(self, sample: torch.Tensor, velocity: torch.Tensor, index: int) -> torch.Tensor:
        """Data prediction x0 = x - sigma * v."""
        return sample - self._sigma[index] * velocity

    def _exponential_step(self, x_s: torch.Tensor, s: int, t: int, x0_term: torch.Tensor) -> torch.Tensor:
        """The data-prediction exponential integrator step shared by UniPC and DPM-Solver++:
        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_term, h = lambda_t - lambda_s.
        At sigma_t = 0, h = +inf and this returns x0_term."""
        h = self._lambda[t] - self._lambda[s]
        x0_weight = -(1.0 - self._sigma[t]) * math.expm1(-h)  # alpha_t (1 - e^{-h})
        return (self._sigma[t] / self._sigma[s]) * x_s + x0_weight * x0_term

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.num_steps}, sigmas[0]={self._sigma[0]:.6f})"


class FlowUniPCSampler(_FlowSampler):
    """UniPC (Zhao et al. 2023), B(h) = e^{-h} - 1 ("bh2"), order 2, data prediction, lower order final.

    Matches diffusers `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
    final_sigmas_type="zero", timestep_spacing="linspace")`, the config of the Wan Diffusers checkpoints.

    Schedule: sigma_i = shift_sigmas(linspace(1, 1/T, steps + 1)[:-1], shift), the first one pulled down by
    1e-6 to keep lambda finite, then 0. Wan's own FlowUniPCMultistepScheduler (sample_solver='unipc')
    instead shifts linspace(1 - 1/T, 0, steps + 1)[:-1], i.e. exactly 1/T lower before the shift. The shift
    magnifies that near sigma = 0 (slope up to `shift`), so Wan's timesteps are lower by up to ~shift at the
    low-noise end: 50 steps, shift 5: last timestep 92 (Wan) vs 96 (here, diffusers); 40 steps, shift 12:
    235 vs 242. The first timestep is 999 in both, and the update formulas are the same.

    With x0_i = x_i - sigma_i v_i, h = lambda_t - lambda_s, step s -> t:
      predictor  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) (x0_s + 1/2 D1)       (order 2)
                 with D1 = (x0_{s-1} - x0_s) / r1, r1 = (lambda_{s-1} - lambda_s) / h; order 1 drops D1.
      corrector  once x0_t is known, the step s -> t is redone before predicting further:
                 x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) (x0_s + rho_1 D1 + rho_t (x0_t - x0_s))
                 order 1: rho_t = 1/2, no D1; order 2: [[1, 1], [r1, 1]] [rho_1, rho_t] = [b1, b2],
                 b_k = k! phi_{k+1}(-h) (-h)^k / B(h), the phi-function coefficients of the B(h) variant.
      The corrected x_t is kept, but x0_t (from the uncorrected x_t) stays in the history, as in UniPC.
    Order: 1 at the first step (no history) and the last (lower_order_final), else 2.
    """

    name = "unipc"
    solver_order = 2

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000) -> None:
        _check_schedule_args(steps, shift, num_train_timesteps)
        sigmas = np.linspace(1.0, 1.0 / num_train_timesteps, steps + 1)[:-1]
        sigmas = shift_sigmas(sigmas, shift)
        if abs(sigmas[0] - 1.0) < 1e-6:
            sigmas[0] -= 1e-6  # sigma = 1 gives alpha = 0 and lambda = -inf
        super().__init__(_with_final_zero(sigmas), _integer_timesteps(sigmas, num_train_timesteps))
        self._x0_history: list[torch.Tensor] = []  # data predictions at the last <= 2 steps, oldest first
        self._last_sample: torch.Tensor | None = None  # x at the previous step, after its correction
        self._last_order = 0

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """v at sigmas[index], x [B, C, F, H, W] -> x at sigmas[index + 1], float32."""
        sample, velocity = self._begin_step(model_output, index, sample)
        x0 = self._x0(sample, velocity, index)
        if index > 0:
            sample = self._correct(x0, index)
        self._x0_history = (self._x0_history + [x0])[-self.solver_order :]
        order = min(self.solver_order, self.num_steps - index, index + 1)
        self._last_sample, self._last_order = sample, order
        return self._predict(sample, index, order)

    def _predict(self, sample: torch.Tensor, index: int, order: int) -> torch.Tensor:
        """UniP: x at sigmas[index] -> x at sigmas[index + 1]."""
        s, t = index, index + 1
        x0_s = self._x0_history[-1]
        x0_term = x0_s
        if order == 2:
            r1 = (self._lambda[s - 1] - self._lambda[s]) / (self._lambda[t] - self._lambda[s])
            x0_term = x0_s + (0.5 / r1) * (self._x0_history[-2] - x0_s)
        return self._exponential_step(sample, s, t, x0_term)

    def _correct(self, x0_t: torch.Tensor, index: int) -> torch.Tensor:
        """UniC: redo the step sigmas[index - 1] -> sigmas[index] with the new data prediction x0_t."""
        s, t = index - 1, index
        h = self._lambda[t] - self._lambda[s]
        x0_s = self._x0_history[-1]
        if self._last_order == 1:
            x0_term = x0_s + 0.5 * (x0_t - x0_s)
        else:
            r1 = (self._lambda[s - 1] - self._lambda[s]) / h
            b1, b2 = _unipc_bh2_b(h)
            rho_1 = (b1 - b2) / (1.0 - r1)
            rho_t = b1 - rho_1
            x0_term = x0_s + (rho_1 / r1) * (self._x0_history[-2] - x0_s) + rho_t * (x0_t - x0_s)
        return self._exponential_step(self._last_sample, s, t, x0_term)


def _unipc_bh2_b(h: float) -> tuple[float, float]:
    """Right-hand side [b1, b2] of UniC-2 for B(h) = e^{-h} - 1 (data prediction, so hh = -h):
    b1 = (phi / hh - 1) / B,  b2 = 2 ((phi / hh - 1) / hh - 1/2) / B,  phi = e^{hh} - 1 = B."""
    hh = -h
    b_h = math.expm1(hh)
    phi_2 = b_h / hh - 1.0  # hh * phi_2(hh) in the UniPC paper's notation
    phi_3 = phi_2 / hh - 0.5  # hh * phi_3(hh)
    return phi_2 / b_h, 2.0 * phi_3 / b_h


class FlowDPMSolverSampler(_FlowSampler):
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form, data prediction; first order at the first and last
    step. Wan's 'dpm++' sample_solver is this family.

    Matches diffusers `DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
    final_sigmas_type="zero")`.

    Schedule: sigma_i = shift_sigmas(linspace(1 - 1/T, 0, steps + 1)[:-1], shift), then 0 (diffusers builds
    it as 1 - linspace(1, 1/T, ...), reversed). Wan's own 'dpm++' path passes
    shift_sigmas(linspace(1, 0, steps + 1)[:-1]) instead, so it starts at sigma = 1 (timestep 1000).

    With x0_i = x_i - sigma_i v_i and h = lambda_t - lambda_s, step s -> t:
      x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D
      D = x0_s (first order)   or   D = x0_s + 1/(2 r0) (x0_s - x0_{s-1}), r0 = (lambda_s - lambda_{s-1}) / h.
    """

    name = "dpm++"

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000) -> None:
        _check_schedule_args(steps, shift, num_train_timesteps)
        sigmas = 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, steps + 1)
        sigmas = shift_sigmas(sigmas, shift)[::-1][:-1].copy()
        super().__init__(_with_final_zero(sigmas), _integer_timesteps(sigmas, num_train_timesteps))
        self._prev_x0: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """v at sigmas[index], x [B, C, F, H, W] -> x at sigmas[index + 1], float32."""
        sample, velocity = self._begin_step(model_output, index, sample)
        x0 = self._x0(sample, velocity, index)
        s, t = index, index + 1
        first_order = index == 0 or index == self.num_steps - 1
        d = x0
        if not first_order:
            r0 = (self._lambda[s] - self._lambda[s - 1]) / (self._lambda[t] - self._lambda[s])
            d = x0 + (0.5 / r0) * (x0 - self._prev_x0)
        self._prev_x0 = x0
        return self._exponential_step(sample, s, t, d)


class FlowEulerSampler(_FlowSampler):
    """Flow-matching Euler: x_t = x_s + (sigma_t - sigma_s) v_s.

    Matches diffusers `FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)`, whose schedule
    applies the shift twice at the low-noise end: __init__ shifts the training grid (k / T, k = T..1,
    float32), so its smallest sigma is shift_sigmas(1/T); set_timesteps spaces `steps` points linearly between
    1 and that value (not steps + 1 points down to 0) and shifts them again. The last sigma before 0 is thus
    shift_sigmas(shift_sigmas(1/T)), e.g. 0.126 for shift 12, and the timesteps are float, not integers.
    """

    name = "euler"

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000) -> None:
        _check_schedule_args(steps, shift, num_train_timesteps)
        # The two ends of diffusers' shifted training grid, computed in float32 as it does.
        train_ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
        sigma_max, sigma_min = shift_sigmas(train_ends, shift).tolist()
        t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
        sigmas = torch.from_numpy(shift_sigmas(t / num_train_timesteps, shift)).to(torch.float32)
        timesteps = sigmas * num_train_timesteps  # float32 product, as diffusers
        super().__init__(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps)

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """v at sigmas[index], x [B, C, F, H, W] -> x at sigmas[index + 1], float32."""
        sample, velocity = self._begin_step(model_output, index, sample)
        return sample + (self._sigma[index + 1] - self._sigma[index]) * velocity


SAMPLERS: dict[str, type] = {
    cls.name: cls for cls in (FlowUniPCSampler, FlowDPMSolverSampler, FlowEulerSampler)
}


def make_sampler(name: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> Sampler:
    """A fresh sampler (one request's state) for `steps` steps of Wan's shifted flow schedule."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](steps, shift, num_train_timesteps)
