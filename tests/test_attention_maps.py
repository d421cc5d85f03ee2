"""Tests for in-graph attention-map consolidation and smoothing filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editing_jax.sampling import attention_maps as am

NOISE = jax.random.uniform(jax.random.PRNGKey(0), (2, 12, 12))  # [B, H, W]


@pytest.mark.parametrize("method", am.SMOOTHING_METHODS)
def test_smooth_outputs_in_unit_range_and_jits(method):
    out = jax.jit(lambda m: am.smooth(m, method, keep_peaks=True))(NOISE * 5.0 - 1.0)
    assert out.shape == NOISE.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("method", am.SMOOTHING_METHODS)
def test_constant_map_stays_constant(method):
    const = jnp.full((2, 8, 8), 0.4)
    np.testing.assert_allclose(am.smooth(const, method), const, atol=1e-6)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="Unknown"):
        am.smooth(NOISE, "median")


def test_gaussian_reduces_noise_variance():
    assert float(am.gaussian(NOISE, 1.0).var()) < 0.5 * float(NOISE.var())


def test_morphological_opening_removes_spike():
    spike = jnp.zeros((1, 9, 9)).at[0, 4, 4].set(1.0)
    np.testing.assert_allclose(am.morphological(spike, 1), 0.0)
    hole = jnp.ones((1, 9, 9)).at[0, 4, 4].set(0.0)
    np.testing.assert_allclose(am.morphological(hole, 1), 1.0)


def _edge_contrast(maps: jax.Array) -> float:
    return float(maps[0, :, 6].mean() - maps[0, :, 5].mean())


def test_bilateral_preserves_step_edge_better_than_gaussian():
    step = jnp.zeros((1, 12, 12)).at[:, :, 6:].set(1.0)
    bilateral = am.bilateral(step, sigma_space=1.5, sigma_range=0.1, radius=3)
    blurred = am.gaussian(step, 1.5)
    assert _edge_contrast(bilateral) > 0.95
    assert _edge_contrast(bilateral) > _edge_contrast(blurred) + 0.3


def test_adaptive_keeps_detail_where_variance_is_high():
    maps = jnp.zeros((1, 16, 16)).at[0, 4:8, 4:8].set(jax.random.uniform(jax.random.PRNGKey(1), (4, 4)))
    out = am.adaptive(maps, radius=2, sigma=1.0)
    blurred = am.gaussian(maps, 1.0)
    err_adaptive = float(jnp.abs(out - maps)[0, 4:8, 4:8].mean())
    err_blur = float(jnp.abs(blurred - maps)[0, 4:8, 4:8].mean())
    assert err_adaptive < err_blur
    np.testing.assert_allclose(out[0, 12:, 12:], 0.0, atol=1e-6)


def test_preserve_peaks_keeps_top_decile_closer_to_original():
    smoothed = am.gaussian(NOISE, 2.0)
    out = am.preserve_peaks(NOISE, smoothed, alpha=0.7, quantile=0.9)
    top = NOISE >= jnp.quantile(NOISE, 0.9, axis=(-2, -1), keepdims=True)
    assert float(jnp.abs(out - NOISE)[top].mean()) < float(jnp.abs(smoothed - NOISE)[top].mean())
    np.testing.assert_array_equal(out[~top], smoothed[~top])
    np.testing.assert_allclose(out[top], (0.7 * NOISE + 0.3 * smoothed)[top], rtol=1e-6)


def test_max_scaling_keeps_a_flat_map_high_where_minmax_stretches_it():
    nearly_flat = jnp.array([[[0.20, 0.21], [0.22, 0.20]]])  # [1, 2, 2]: attention spread over the whole image
    minmax = am.rescale(nearly_flat, "minmax")
    by_max = am.rescale(nearly_flat, "max")
    assert float(minmax.min()) == 0.0 and float(minmax.max()) == 1.0  # region hold at any lambda holds a corner
    np.testing.assert_allclose(by_max, nearly_flat / 0.22, atol=1e-6)
    assert float(by_max.min()) > 0.9
    peaked = jnp.array([[[0.0, 0.0], [0.0, 0.8]]])
    np.testing.assert_allclose(am.rescale(peaked, "max"), am.rescale(peaked, "minmax"), atol=1e-6)
    assert float(am.smooth(nearly_flat, "none", scaling="max").min()) > 0.9
    with pytest.raises(ValueError, match="Unknown scaling"):
        am.rescale(nearly_flat, "sum")


def test_consolidate_averages_selected_layers_heads_and_text_positions():
    # 3 layers, B=2, 2 heads, Lq = 3 text + 4 image queries, Lk = 3 text + 4 image keys (2x2 grid).
    probs = np.zeros((3, 2, 2, 7, 7), np.float32)
    image = slice(3, 7)
    probs[0, :, :, 0, image] = [9.0, 9.0, 9.0, 0.0]  # layer 0 is excluded
    probs[1, :, 0, 0, image] = [1.0, 0.0, 0.0, 0.0]  # head 0, text 0
    probs[1, :, 1, 0, image] = [0.0, 1.0, 0.0, 0.0]  # head 1, text 0
    probs[2, :, :, 1, image] = [0.0, 0.0, 2.0, 0.0]  # text 1 (masked out for example 1)
    probs[1:, :, :, 2, image] = [0.0, 0.0, 0.0, 50.0]  # text 2 is never selected
    probs[1:, :, :, 4:, image] = 100.0  # image->image attention must be ignored
    text_positions = jnp.array([[1, 1, 0], [1, 0, 0]], bool)

    for given in (jnp.asarray(probs), [jnp.asarray(p) for p in probs]):
        maps = am.consolidate(given, (1, 3), text_positions, image)
        assert maps.shape == (2, 2, 2)
        # Example 0: mean over layers {1, 2}, heads, texts {0, 1}: [0.125, 0.125, 0.5, 0] -> rescaled.
        np.testing.assert_allclose(maps[0].ravel(), [0.25, 0.25, 1.0, 0.0], atol=1e-6)
        # Example 1: text 0 only: [0.25, 0.25, 0, 0] -> rescaled.
        np.testing.assert_allclose(maps[1].ravel(), [1.0, 1.0, 0.0, 0.0], atol=1e-6)
        by_max = am.consolidate(given, (1, 3), text_positions, image, scaling="max")
        np.testing.assert_allclose(by_max[0].ravel(), [0.25, 0.25, 1.0, 0.0], atol=1e-6)  # min is 0: same
        # Summed over the selected texts and not rescaled: example 0 is [0.25, 0.25, 1.0, 0], example 1 [0.25, ...].
        summed = am.consolidate(given, (1, 3), text_positions, image, scaling="none", sum_text=True)
        np.testing.assert_allclose(summed[0].ravel(), [0.25, 0.25, 1.0, 0.0], atol=1e-6)
        np.testing.assert_allclose(summed[1].ravel(), [0.25, 0.25, 0.0, 0.0], atol=1e-6)


def test_none_scaling_only_clips():
    maps = jnp.asarray([[[0.2, 0.4], [-0.5, 1.5]]])
    np.testing.assert_allclose(am.rescale(maps, "none"), [[[0.2, 0.4], [0.0, 1.0]]])


def test_consolidate_rejects_non_square_without_grid_shape():
    probs = jnp.ones((1, 1, 1, 2, 5))
    with pytest.raises(ValueError, match="grid_shape"):
        am.consolidate(probs, (0, 1), jnp.ones((1, 1), bool), slice(2, 5))
    out = am.consolidate(probs, (0, 1), jnp.ones((1, 1), bool), slice(2, 5), grid_shape=(1, 3))
    assert out.shape == (1, 1, 3)
