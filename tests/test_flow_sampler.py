"""Tests for the rectified-flow ODE / Flow-GRPO SDE samplers against a float64 NumPy reference and analytic flows."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editing_jax.sampling import flow

B, H, W, C = 3, 4, 4, 2
SHAPE = (B, H, W, C)


def _normal(seed: int, shape=SHAPE, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def numpy_sde_step(x, v, t, t_next, noise_level, *, noise=None, sample=None, reduction="mean"):
    """Float64 reference, written in Flow-GRPO's algebraic form (x and v coefficients) rather than drift form.

    t, t_next: per-example arrays [B]. Returns (x_next, log_prob [B], mean, std [B, 1, 1, 1]).
    """
    x, v = np.asarray(x, np.float64), np.asarray(v, np.float64)
    t = np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
    t_next = np.asarray(t_next, np.float64).reshape(-1, 1, 1, 1)
    dt = t_next - t
    sigma = noise_level * np.sqrt(t / (1.0 - np.where(t == 1.0, t_next, t)))
    mean = x * (1.0 + sigma**2 / (2.0 * t) * dt) + v * (1.0 + sigma**2 * (1.0 - t) / (2.0 * t)) * dt
    std = sigma * np.sqrt(-dt)
    if sample is None:
        sample = mean + std * np.asarray(noise, np.float64)
    sample = np.asarray(sample, np.float64)
    log_density = -((sample - mean) ** 2) / (2.0 * std**2) - np.log(std) - 0.5 * np.log(2.0 * np.pi)
    reduce = np.mean if reduction == "mean" else np.sum
    return sample, reduce(log_density, axis=(1, 2, 3)), mean, std


def test_timesteps_schedule_and_shift():
    ts = np.asarray(flow.timesteps(8))
    assert ts.shape == (9,) and ts.dtype == np.float32
    np.testing.assert_allclose(ts, np.linspace(1.0, 0.0, 9), atol=1e-7)
    shifted = np.asarray(flow.timesteps(8, shift=3.0))
    base = np.linspace(1.0, 0.0, 9)
    np.testing.assert_allclose(shifted, 3.0 * base / (1.0 + 2.0 * base), rtol=1e-6)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert np.all(np.diff(shifted) < 0) and np.all(shifted[1:-1] > base[1:-1])  # shift > 1 spends more time noisy
    with pytest.raises(ValueError, match="num_steps"):
        flow.timesteps(0)


def test_sde_window_mask_static_and_traced():
    np.testing.assert_array_equal(flow.sde_window_mask(6, 2, 3), [False, False, True, True, True, False])
    traced = jax.jit(lambda r: flow.sde_window_mask(6, r, 2))(jnp.int32(4))
    np.testing.assert_array_equal(traced, [False, False, False, False, True, True])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sde_step_matches_numpy_float64_reference(reduction):
    x, v, noise = _normal(0), _normal(1, scale=2.0), _normal(2)
    t = jnp.array([1.0, 0.7, 0.3], jnp.float32)  # [B]; the t == 1 row exercises the singularity guard
    t_next = jnp.array([0.9, 0.55, 0.1], jnp.float32)
    noise_level = 0.7
    x_next, log_prob, mean, std = flow.sde_step(
        x, v, t, t_next, noise_level=noise_level, noise=noise, log_prob_reduction=reduction
    )
    assert x_next.dtype == log_prob.dtype == jnp.float32 and log_prob.shape == (B,)
    ref_next, _, ref_mean, ref_std = numpy_sde_step(x, v, t, t_next, noise_level, noise=noise, reduction=reduction)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5)
    np.testing.assert_allclose(x_next, ref_next, rtol=1e-5, atol=1e-5)
    # Log-prob of the float32 sample actually returned, and of an arbitrary off-policy sample.
    _, ref_log_prob, _, _ = numpy_sde_step(x, v, t, t_next, noise_level, sample=x_next, reduction=reduction)
    np.testing.assert_allclose(log_prob, ref_log_prob, rtol=1e-5, atol=1e-4 if reduction == "sum" else 1e-5)
    other = _normal(3)
    _, other_log_prob, _, _ = flow.sde_step(
        x, v, t, t_next, noise_level=noise_level, prev_sample=other, log_prob_reduction=reduction
    )
    _, ref_other, _, _ = numpy_sde_step(x, v, t, t_next, noise_level, sample=other, reduction=reduction)
    np.testing.assert_allclose(other_log_prob, ref_other, rtol=1e-5)
    # Mean vs sum is exactly a factor of the per-example element count.
    scale = 1.0 if reduction == "mean" else 1.0 / (H * W * C)
    assert np.all(np.asarray(other_log_prob) * scale < np.asarray(log_prob) * scale)  # off-policy is less likely


def test_scalar_time_and_callable_noise_level():
    x, v, noise = _normal(0), _normal(1), _normal(2)
    _, log_prob, mean, _ = flow.sde_step(x, v, 0.6, 0.4, noise_level=0.5, noise=noise)
    _, ref_log_prob, ref_mean, _ = numpy_sde_step(x, v, [0.6] * B, [0.4] * B, 0.5, noise=noise)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)
    # A callable giving the same sigma_t reproduces the scalar form.
    sigma = 0.5 * math.sqrt(0.6 / 0.4)
    _, callable_log_prob, callable_mean, _ = flow.sde_step(x, v, 0.6, 0.4, noise_level=lambda t: sigma, noise=noise)
    np.testing.assert_allclose(callable_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(callable_log_prob, log_prob, rtol=1e-5)


def test_zero_noise_level_is_exact_ode_step_with_zero_log_prob():
    x, v = _normal(0), _normal(1)
    for t, t_next in [(1.0, 0.8), (0.5, 0.25), (0.1, 0.0)]:
        x_next, log_prob, mean, std = flow.sde_step(x, v, t, t_next, noise_level=0.0, rng=jax.random.PRNGKey(5))
        expected = flow.ode_step(x, v, t, t_next)
        np.testing.assert_array_equal(x_next, expected)
        np.testing.assert_array_equal(mean, expected)
        assert float(std) == 0.0
        np.testing.assert_array_equal(log_prob, np.zeros(B, np.float32))
    np.testing.assert_allclose(flow.ode_step(x, v, 0.5, 0.25), np.asarray(x) - 0.25 * np.asarray(v), rtol=1e-6)
    # The deterministic branch must not poison gradients with NaN/inf.
    grad = jax.grad(lambda v: flow.sde_step(x, v, 0.5, 0.25, noise_level=0.0, prev_sample=x)[1].sum())(v)
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_on_policy_importance_ratio_is_exactly_one():
    x, v = _normal(0), _normal(1)
    t = jnp.array([1.0, 0.6, 0.2], jnp.float32)
    t_next = jnp.array([0.95, 0.5, 0.05], jnp.float32)
    step = jax.jit(functools.partial(flow.sde_step, noise_level=0.7))
    x_next, old, _, _ = step(x, v, t, t_next, rng=jax.random.PRNGKey(9))
    _, new, _, _ = step(x, v, t, t_next, prev_sample=x_next)
    np.testing.assert_array_equal(jnp.exp(new - old), np.ones(B, np.float32))


def test_log_prob_gradient_flows_through_mean_only():
    x, v, sample = _normal(0), _normal(1), _normal(2)
    t, t_next, a = 0.6, 0.4, 0.7

    def log_prob(v, sample):
        return flow.sde_step(x, v, t, t_next, noise_level=a, prev_sample=sample, log_prob_reduction="sum")[1].sum()

    grad_v, grad_sample = jax.grad(log_prob, argnums=(0, 1))(v, sample)
    np.testing.assert_array_equal(grad_sample, np.zeros(SHAPE, np.float32))  # sample is stop_gradient-ed
    # Analytic: d log p / d mean = (sample - mean) / std^2, d mean / d v = (1 + sigma^2 (1 - t) / (2 t)) dt.
    _, _, mean, std = numpy_sde_step(x, v, [t] * B, [t_next] * B, a, sample=sample)
    sigma2 = a**2 * t / (1 - t)
    expected = (np.asarray(sample, np.float64) - mean) / std**2 * (1 + sigma2 * (1 - t) / (2 * t)) * (t_next - t)
    np.testing.assert_allclose(grad_v, expected, rtol=1e-4, atol=1e-5)


def _gaussian_velocity(mu: jax.Array, s: jax.Array):
    """Exact velocity E[eps - x_0 | x_t = x] for data x_0 ~ N(mu, diag(s^2)) and x_t = (1 - t) x_0 + t eps."""

    def velocity_fn(x, t):
        var_t = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var_t * (x - (1 - t) * mu) - mu

    return velocity_fn


@functools.partial(jax.jit, static_argnames=("naive",))
def _sample_gaussian(mu, s, rng, *, naive: bool):
    """Samples the Gaussian toy with the Flow-GRPO SDE, or (naive) with the drift-v-only SDE as a negative control."""
    velocity_fn = _gaussian_velocity(mu, s)
    ts = flow.timesteps(80)
    init_rng, rng = jax.random.split(rng)
    x_T = jax.random.normal(init_rng, (32768, mu.shape[0]), jnp.float32)  # [N, D]
    if not naive:
        return flow.sample(velocity_fn, x_T, timesteps=ts, rng=rng, noise_level=0.7)[0]

    def body(x, inputs):
        t, t_next, key = inputs
        std = flow.sde_sigma(0.7, t, t_next) * jnp.sqrt(t - t_next)
        return flow.ode_step(x, velocity_fn(x, t), t, t_next) + std * jax.random.normal(key, x.shape), None

    return jax.lax.scan(body, x_T, (ts[:-1], ts[1:], jax.random.split(rng, 80)))[0]


def test_sde_preserves_gaussian_marginals():
    mu = jnp.array([1.5, -1.0, 0.0, 0.5], jnp.float32)  # [D]
    s = jnp.array([0.5, 1.0, 0.3, 2.0], jnp.float32)
    rng = jax.random.PRNGKey(0)
    x_0 = np.asarray(_sample_gaussian(mu, s, rng, naive=False))  # [N, D]
    n = x_0.shape[0]
    # Sampling error: mean SE = s / sqrt(N), relative var SE = sqrt(2 / N) = 0.8%; Euler bias at 80 steps is ~1%.
    np.testing.assert_allclose(x_0.mean(0), mu, atol=4 * float(s.max()) / math.sqrt(n) + 0.01)
    np.testing.assert_allclose(x_0.var(0), np.asarray(s) ** 2, rtol=0.04)
    # Negative control: without the score correction the extra noise inflates the variance far beyond tolerance.
    naive = np.asarray(_sample_gaussian(mu, s, rng, naive=True))
    assert np.all(np.abs(naive.var(0) / np.asarray(s) ** 2 - 1) > 0.25), naive.var(0)


def _velocity(params, x, t):
    """A nonlinear, time-dependent toy velocity field."""
    return jnp.tanh(x * params["w"] + t) + params["b"] * x


PARAMS = {"w": jnp.float32(1.3), "b": jnp.float32(-0.4)}


def test_sample_under_jit_equals_python_loop_of_steps():
    num_steps = 6
    ts = flow.timesteps(num_steps, shift=2.0)
    x_T, rng = _normal(4), jax.random.PRNGKey(11)
    mask = flow.sde_window_mask(num_steps, 1, 3)

    @jax.jit
    def run(start, rng):
        window = flow.sde_window_mask(num_steps, start, 3)
        return flow.sample(
            functools.partial(_velocity, PARAMS), x_T, timesteps=ts, rng=rng, noise_level=0.8, sde_steps_mask=window
        )

    x_0, trajectory, log_probs = run(jnp.int32(1), rng)
    assert trajectory.shape == (num_steps + 1, *SHAPE) and log_probs.shape == (num_steps, B)

    keys = jax.random.split(rng, num_steps)
    x, states, expected_log_probs = x_T, [x_T], []
    for s in range(num_steps):
        v = _velocity(PARAMS, x, ts[s])
        if bool(mask[s]):
            x, log_prob, _, _ = flow.sde_step(x, v, ts[s], ts[s + 1], noise_level=0.8, rng=keys[s])
        else:
            x, log_prob = flow.ode_step(x, v, ts[s], ts[s + 1]), jnp.zeros((B,), jnp.float32)
        states.append(x)
        expected_log_probs.append(log_prob)
    np.testing.assert_allclose(trajectory, np.stack(states), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_0, states[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_probs, np.stack(expected_log_probs), rtol=1e-5, atol=1e-5)
    assert not np.any(log_probs[np.asarray(~mask)]) and np.all(log_probs[np.asarray(mask)] != 0)

    # Teacher-forced recomputation with the same policy gives ratio 1; a changed policy does not.
    def recompute(params):
        return flow.trajectory_log_probs(
            functools.partial(_velocity, params), trajectory, timesteps=ts, noise_level=0.8, sde_steps_mask=mask
        )

    np.testing.assert_allclose(jnp.exp(jax.jit(recompute)(PARAMS) - log_probs), 1.0, rtol=1e-5)
    changed = jax.jit(recompute)({"w": PARAMS["w"], "b": PARAMS["b"] + 0.5})
    change = np.abs(np.asarray(changed - log_probs))[np.asarray(mask)]  # [3, B]
    assert np.all(change > 1e-5) and change.mean() > 5e-3, change


def test_dense_window_gradient_is_finite_and_crosses_steps():
    ts = flow.timesteps(5)
    x_T = _normal(6)

    def loss(params):
        x_0, _, log_probs = flow.sample(
            functools.partial(_velocity, params),
            x_T,
            timesteps=ts,
            rng=jax.random.PRNGKey(2),
            noise_level=0.7,
            sde_steps_mask=flow.sde_window_mask(5, 1, 2),
        )
        return jnp.mean(x_0**2) + jnp.mean(log_probs)

    grads = jax.jit(jax.grad(loss))(PARAMS)
    assert all(np.isfinite(g) and g != 0 for g in jax.tree.leaves(grads))


def test_bad_arguments_raise():
    x, v = _normal(0), _normal(1)
    with pytest.raises(ValueError, match="exactly one"):
        flow.sde_step(x, v, 0.5, 0.4, noise_level=0.7)
    with pytest.raises(ValueError, match="log_prob_reduction"):
        flow.sde_step(x, v, 0.5, 0.4, noise_level=0.7, noise=x, log_prob_reduction="max")
    with pytest.raises(ValueError, match="sde_steps_mask"):
        flow.sample(
            lambda x, t: x,
            x,
            timesteps=flow.timesteps(4),
            rng=jax.random.PRNGKey(0),
            noise_level=0.7,
            sde_steps_mask=jnp.ones((3,), bool),
        )
