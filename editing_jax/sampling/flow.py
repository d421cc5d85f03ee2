"""Rectified-flow samplers: Euler ODE and the Flow-GRPO Euler-Maruyama SDE with per-step Gaussian log-probs.

Conventions: x_t = (1 - t) x_0 + t eps with t running from 1 (noise) to 0 (data); the model predicts the velocity
v = eps - x_0, so the probability-flow ODE is dx = v dt and an Euler step from t to t' < t is x_t' = x_t + (t' - t) v.

SDE (Flow-GRPO, Liu et al. 2025, used by CogniEdit's GRPO / Dense GRPO). For the forward process above, Tweedie gives
E[eps | x_t] = x_t + (1 - t) v, so the score is grad log p_t(x) = -(x + (1 - t) v) / t. For any sigma_t the reverse-time
SDE

    dx = [v - (sigma_t^2 / 2) grad log p_t(x)] dt + sigma_t dW        (dt < 0)
       = [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dW

has the same marginals p_t as the ODE (its Fokker-Planck equation reduces to the continuity equation of dx = v dt).
One Euler-Maruyama step from t to t_next, with dt = t_next - t < 0, is the Gaussian policy

    x_next ~ N(mean, std^2),  mean = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt,  std = sigma_t sqrt(|dt|),

which is algebraically identical to `sd3_sde_with_logprob.py` in yifan123/flow_grpo
(x (1 + sigma^2 dt / (2t)) + v (1 + sigma^2 (1 - t) / (2t)) dt). The default noise schedule is Flow-GRPO's
sigma_t = a sqrt(t / (1 - t)), a = `noise_level`; at t = 1 it is infinite, so where t >= 1 the denominator uses
1 - t_next instead (the reference uses 1 - sigmas[1], i.e. the same number on a schedule starting at t = 1).

Log-probs are float32 Gaussian log-densities of x_next under that policy, reduced over all non-batch dims with a
mean (the reference's choice, which keeps their scale independent of the latent size; `log_prob_reduction="sum"` gives
the true joint log-density). The evaluated sample is wrapped in `stop_gradient` as in the reference, so gradients flow
through the mean only; gradients still flow through x_t (i.e. through earlier steps of a trajectory), which Dense GRPO
relies on. A step with std == 0 (noise level 0, or an ODE step inside `sample`) is deterministic: its log-prob is
defined as 0, so it contributes nothing to trajectory log-likelihoods and its importance ratio is exactly 1.

All sampler math runs in float32 (the reference casts to float32 because the SDE mean overflows in bf16); returned
states are float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# velocity_fn(x [B, ...] float32, t [] float32) -> v [B, ...]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
# A noise level is either Flow-GRPO's scale `a` (sigma_t = a sqrt(t / (1 - t))) or a function t -> sigma_t.
NoiseLevel = float | jax.Array | Callable[[jax.Array], jax.Array]

LOG_PROB_REDUCTIONS = ("mean", "sum")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def time_shift(t: jax.Array | float, shift: float | jax.Array) -> jax.Array:
    """SD3/Flux resolution time shift t' = shift t / (1 + (shift - 1) t); keeps 0 and 1 fixed, shift > 1 adds noise."""
    t = jnp.asarray(t, jnp.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def timesteps(num_steps: int, shift: float | jax.Array = 1.0) -> jax.Array:
    """Sampling schedule from t = 1 (noise) down to t = 0 (data).

    Args:
        num_steps: number of steps S (static, >= 1).
        shift: time shift (see `time_shift`); 1.0 gives uniform spacing.

    Returns:
        [S + 1] float32, strictly decreasing, first entry exactly 1 and last exactly 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if isinstance(shift, (int, float)) and shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    return time_shift(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)  # [S + 1]


def sde_window_mask(num_steps: int, start: int | jax.Array, length: int | jax.Array) -> jax.Array:
    """[S] bool mask of the SDE steps start, ..., start + length - 1 (Dense GRPO's k consecutive steps from r).

    `start` and `length` may be traced (e.g. r drawn per training step); steps outside [0, S) are ignored.
    """
    step = jnp.arange(num_steps)
    return (step >= start) & (step < start + length)  # [S]


def _broadcast_time(t: jax.Array | float, ndim: int) -> jax.Array:
    """Scalar time -> [] float32; per-example time [B] -> [B, 1, ..., 1] to broadcast against an ndim-rank state."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        return t
    if t.ndim == 1:
        return t.reshape((-1,) + (1,) * (ndim - 1))
    raise ValueError(f"time must be a scalar or [B], got shape {t.shape}.")


def sde_sigma(noise_level: NoiseLevel, t: jax.Array | float, t_next: jax.Array | float) -> jax.Array:
    """Diffusion coefficient sigma_t of the SDE step from t to t_next.

    Args:
        noise_level: Flow-GRPO's scale a (scalar or array, may be traced), giving sigma_t = a sqrt(t / (1 - t)) with
            the t = 1 singularity guarded by using 1 - t_next as the denominator where t >= 1; or a callable
            t -> sigma_t (then finiteness at t = 1 is the callable's business; e.g. `lambda t: 0.7 * t`).
        t: current time(s), broadcastable against t_next.
        t_next: next time(s).

    Returns:
        sigma_t as float32, broadcast shape of the inputs.
    """
    t = jnp.asarray(t, jnp.float32)
    if callable(noise_level):
        return jnp.asarray(noise_level(t), jnp.float32)
    t_denominator = jnp.where(t >= 1.0, jnp.asarray(t_next, jnp.float32), t)
    return jnp.asarray(noise_level, jnp.float32) * jnp.sqrt(t / (1.0 - t_denominator))


def ode_step(x: jax.Array, v: jax.Array, t: jax.Array | float, t_next: jax.Array | float) -> jax.Array:
    """Euler step of the probability-flow ODE: x_next = x + (t_next - t) v, in float32.

    Args:
        x: [B, ...] state at time t.
        v: [B, ...] velocity at (x, t).
        t: [] or [B] current time.
        t_next: [] or [B] next time (< t when denoising).

    Returns:
        [B, ...] float32 state at t_next.
    """
    x = x.astype(jnp.float32)
    v = v.astype(jnp.float32)
    dt = _broadcast_time(t_next, x.ndim) - _broadcast_time(t, x.ndim)  # [] or [B, 1, ...]
    return x + v * dt


def _gaussian_log_prob(sample: jax.Array, mean: jax.Array, std: jax.Array, reduction: str) -> jax.Array:
    """Per-example log N(sample; mean, std^2), reduced over non-batch dims; 0 where std == 0 (deterministic)."""
    positive = std > 0.0
    safe_std = jnp.where(positive, std, 1.0)  # keeps the unused branch (and its gradient) finite
    log_density = -jnp.square(sample - mean) / (2.0 * jnp.square(safe_std)) - jnp.log(safe_std) - _HALF_LOG_2PI
    log_density = jnp.where(positive, log_density, 0.0)  # [B, ...]
    axes = tuple(range(1, log_density.ndim))
    if reduction == "mean":
        return jnp.mean(log_density, axis=axes)  # [B]
    return jnp.sum(log_density, axis=axes)  # [B]


def _check_reduction(log_prob_reduction: str) -> None:
    if log_prob_reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"log_prob_reduction must be one of {LOG_PROB_REDUCTIONS}, got {log_prob_reduction!r}.")


def _sde_step_with_sigma(
    x: jax.Array,
    v: jax.Array,
    t: jax.Array | float,
    t_next: jax.Array | float,
    sigma: jax.Array,
    noise: jax.Array | None,
    prev_sample: jax.Array | None,
    log_prob_reduction: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`sde_step` given sigma_t (already broadcastable against x); see there."""
    x = x.astype(jnp.float32)  # [B, ...]
    v = v.astype(jnp.float32)  # [B, ...]
    t = _broadcast_time(t, x.ndim)  # [] or [B, 1, ...]
    dt = _broadcast_time(t_next, x.ndim) - t
    drift = v + jnp.square(sigma) / (2.0 * t) * (x + (1.0 - t) * v)  # [B, ...]; = v when sigma == 0
    mean = x + drift * dt  # [B, ...]
    std = sigma * jnp.sqrt(jnp.abs(dt))  # [] or [B, 1, ...]
    if prev_sample is None:
        x_next = mean + std * noise.astype(jnp.float32)
    else:
        x_next = prev_sample.astype(jnp.float32)
    log_prob = _gaussian_log_prob(jax.lax.stop_gradient(x_next), mean, std, log_prob_reduction)  # [B]
    return x_next, log_prob, mean, std


def sde_step(
    x: jax.Array,
    v: jax.Array,
    t: jax.Array | float,
    t_next: jax.Array | float,
    *,
    noise_level: NoiseLevel,
    rng: jax.Array | None = None,
    noise: jax.Array | None = None,
    prev_sample: jax.Array | None = None,
    log_prob_reduction: str = "mean",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One Flow-GRPO Euler-Maruyama step from t to t_next < t, with the Gaussian log-prob of the result.

    mean = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] (t_next - t), std = sigma_t sqrt(|t_next - t|) (module
    docstring has the derivation). With sigma_t = 0 this is exactly `ode_step` and the log-prob is 0.

    Args:
        x: [B, ...] state at time t (any float dtype; computed in float32).
        v: [B, ...] predicted velocity at (x, t).
        t: [] or [B] current time, in (0, 1].
        t_next: [] or [B] next time, in [0, t).
        noise_level: a in sigma_t = a sqrt(t / (1 - t)), or a callable t -> sigma_t (see `sde_sigma`).
        rng: PRNG key for the step noise (exactly one of rng / noise unless prev_sample is given).
        noise: [B, ...] standard normal noise to use instead of drawing it.
        prev_sample: [B, ...] an already sampled x_next whose log-prob to compute instead of sampling (importance
            ratios in GRPO); it is returned unchanged as x_next (in float32).
        log_prob_reduction: "mean" (Flow-GRPO) or "sum" over the non-batch dims of the per-element log-density.

    Returns:
        x_next: [B, ...] float32 sample at t_next (or prev_sample).
        log_prob: [B] float32 log-prob of x_next (0 where std == 0); gradients flow through the mean only.
        mean: [B, ...] float32 mean of the step distribution.
        std: float32 step std sigma_t sqrt(|dt|), shaped [] or [B, 1, ...] to broadcast against x. (The reference
            returns sigma_t itself as its 4th output.)
    """
    _check_reduction(log_prob_reduction)
    if prev_sample is None:
        if (rng is None) == (noise is None):
            raise ValueError("sde_step needs exactly one of rng or noise when prev_sample is not given.")
        if noise is None:
            noise = jax.random.normal(rng, x.shape, jnp.float32)
    ndim = jnp.ndim(x)
    sigma = sde_sigma(noise_level, _broadcast_time(t, ndim), _broadcast_time(t_next, ndim))
    return _sde_step_with_sigma(x, v, t, t_next, sigma, noise, prev_sample, log_prob_reduction)


def _check_schedule(timesteps: jax.Array, sde_steps_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim != 1 or timesteps.shape[0] < 2:
        raise ValueError(f"timesteps must be [S + 1] with S >= 1, got shape {timesteps.shape}.")
    num_steps = timesteps.shape[0] - 1
    if sde_steps_mask is None:
        sde_steps_mask = jnp.ones((num_steps,), bool)
    sde_steps_mask = jnp.asarray(sde_steps_mask, bool)
    if sde_steps_mask.shape != (num_steps,):
        raise ValueError(f"sde_steps_mask must have shape ({num_steps},), got {sde_steps_mask.shape}.")
    return timesteps, sde_steps_mask


def sample(
    velocity_fn: VelocityFn,
    x_T: jax.Array,
    *,
    timesteps: jax.Array,
    rng: jax.Array,
    noise_level: NoiseLevel,
    sde_steps_mask: jax.Array | None = None,
    log_prob_reduction: str = "mean",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Integrates from x_T at timesteps[0] to timesteps[-1] with one `jax.lax.scan`; SDE on masked steps, ODE elsewhere.

    Step s goes from timesteps[s] to timesteps[s + 1]. Its noise is `jax.random.normal(jax.random.split(rng, S)[s],
    x_T.shape)`, drawn on every step (so the noise of an SDE step does not depend on which other steps are SDE), and
    an ODE step is the SDE step with sigma = 0, which is exactly `ode_step` and has log-prob 0. Equivalent to a
    Python loop calling `sde_step(..., rng=keys[s])` on SDE steps and `ode_step` on the others. Differentiable
    end to end (Dense GRPO backpropagates through consecutive steps; wrap `velocity_fn` in `jax.checkpoint` to
    trade compute for memory).

    Args:
        velocity_fn: `(x [B, ...] float32, t [] float32) -> v [B, ...]`.
        x_T: [B, ...] initial noise (cast to float32).
        timesteps: [S + 1] decreasing times, e.g. `timesteps(S, shift)`.
        rng: PRNG key.
        noise_level: a in sigma_t = a sqrt(t / (1 - t)), or a callable t -> sigma_t; may be traced.
        sde_steps_mask: [S] bool, True where the step is an SDE step (e.g. `sde_window_mask`); None means all
            steps. May be traced.
        log_prob_reduction: "mean" (Flow-GRPO) or "sum" over non-batch dims.

    Returns:
        x_0: [B, ...] float32 final state.
        trajectory: [S + 1, B, ...] float32 states, trajectory[0] = x_T and trajectory[-1] = x_0.
        log_probs: [S, B] float32 log-prob of each step's transition (0 on ODE steps).
    """
    _check_reduction(log_prob_reduction)
    timesteps, sde_steps_mask = _check_schedule(timesteps, sde_steps_mask)
    num_steps = timesteps.shape[0] - 1
    x_T = jnp.asarray(x_T).astype(jnp.float32)  # [B, ...]
    keys = jax.random.split(rng, num_steps)

    def body(x: jax.Array, inputs: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        t, t_next, is_sde, key = inputs
        v = velocity_fn(x, t)  # [B, ...]
        sigma = jnp.where(is_sde, sde_sigma(noise_level, t, t_next), 0.0)  # []
        noise = jax.random.normal(key, x.shape, jnp.float32)
        x_next, log_prob, _, _ = _sde_step_with_sigma(x, v, t, t_next, sigma, noise, None, log_prob_reduction)
        return x_next, (x_next, log_prob)

    x_0, (states, log_probs) = jax.lax.scan(body, x_T, (timesteps[:-1], timesteps[1:], sde_steps_mask, keys))
    trajectory = jnp.concatenate([x_T[None], states], axis=0)  # [S + 1, B, ...]
    return x_0, trajectory, log_probs


def trajectory_log_probs(
    velocity_fn: VelocityFn,
    trajectory: jax.Array,
    *,
    timesteps: jax.Array,
    noise_level: NoiseLevel,
    sde_steps_mask: jax.Array | None = None,
    log_prob_reduction: str = "mean",
) -> jax.Array:
    """Log-probs of every stored transition trajectory[s] -> trajectory[s + 1] under (possibly new) velocities.

    This is the teacher-forced counterpart of `sample` for importance ratios exp(new - old): with the velocity_fn,
    timesteps, noise_level and mask used for sampling it reproduces `sample`'s log_probs.

    Args:
        velocity_fn: `(x [B, ...], t []) -> v [B, ...]`.
        trajectory: [S + 1, B, ...] states from `sample`.
        timesteps: [S + 1] times of the trajectory.
        noise_level: as in `sample`.
        sde_steps_mask: [S] bool or None (all steps), as in `sample`.
        log_prob_reduction: "mean" or "sum".

    Returns:
        [S, B] float32 log-probs, 0 on ODE steps.
    """
    _check_reduction(log_prob_reduction)
    timesteps, sde_steps_mask = _check_schedule(timesteps, sde_steps_mask)
    if trajectory.shape[0] != timesteps.shape[0]:
        raise ValueError(f"trajectory has {trajectory.shape[0]} states but timesteps has {timesteps.shape[0]}.")
    trajectory = trajectory.astype(jnp.float32)  # [S + 1, B, ...]

    def body(_: None, inputs: tuple) -> tuple[None, jax.Array]:
        x, x_next, t, t_next, is_sde = inputs
        v = velocity_fn(x, t)
        sigma = jnp.where(is_sde, sde_sigma(noise_level, t, t_next), 0.0)  # []
        _, log_prob, _, _ = _sde_step_with_sigma(x, v, t, t_next, sigma, None, x_next, log_prob_reduction)
        return None, log_prob

    inputs = (trajectory[:-1], trajectory[1:], timesteps[:-1], timesteps[1:], sde_steps_mask)
    _, log_probs = jax.lax.scan(body, None, inputs)
    return log_probs  # [S, B]


__all__ = [
    "LOG_PROB_REDUCTIONS",
    "NoiseLevel",
    "VelocityFn",
    "ode_step",
    "sample",
    "sde_sigma",
    "sde_step",
    "sde_window_mask",
    "time_shift",
    "timesteps",
    "trajectory_log_probs",
]
