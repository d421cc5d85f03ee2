import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.nn.reductions import argmax_last


def test_argmax_last_equals_argmax_ties_and_infinities_included():
    rng = np.random.default_rng(0)
    rows = rng.integers(-3, 4, size=(64, 3, 37)).astype(np.float32)  # few values: most rows tie at the maximum
    rows[0, 0] = 2.0  # all equal: the first index
    rows[1, 1] = -np.inf
    rows[2, 2, 5] = np.inf
    rows[3, 0, [4, 30]] = np.inf  # two infinite maxima: the first
    expected = np.argmax(rows, axis=-1)
    assert np.mean(np.sum(rows == rows.max(-1, keepdims=True), -1) > 1) > 0.5  # the tie case is exercised
    result = jax.jit(argmax_last)(jnp.asarray(rows))
    assert result.dtype == jnp.int32 and result.shape == (64, 3)
    np.testing.assert_array_equal(np.asarray(result), expected)
    continuous = rng.normal(size=(128, 1024)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(argmax_last(jnp.asarray(continuous))), np.argmax(continuous, -1))


def test_argmax_last_maps_a_row_with_nan_to_zero_and_passes_no_gradient():
    rows = jnp.asarray([[0.0, 1.0, np.nan, 3.0], [0.0, 5.0, 1.0, 2.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(argmax_last(rows)), [0, 1])

    def loss(x):  # an index used as a constant weight, as the VQ's nearest code is
        return jnp.sum(x * argmax_last(x)[:, None])

    x = jnp.asarray([[0.0, 2.0, 1.0], [4.0, 0.0, 1.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(x)), [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
