"""Tests for MaskGIT decoding with CFG and region hold, using a fake deterministic logits function."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from editing_jax.sampling import maskgit

V, L, B, STEPS = 16, 64, 2, 8
MASK_ID = V


def _table(seed: int) -> jax.Array:
    return 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (L, V))  # [L, V]


def fake_logits_fn(tokens: jax.Array, step: jax.Array):
    """Fixed table + a term depending on the current tokens and step; uncond from another table."""
    context = 0.2 * jnp.sin(tokens[..., None] * jnp.arange(V) + step)  # [B, L, V]
    return _table(0)[None] + context, _table(1)[None] + context


def fake_attention_fn(tokens: jax.Array, step: jax.Array) -> jax.Array:
    """Scores in [0, 1] that vary with position and step."""
    pos = jnp.arange(L, dtype=jnp.float32)
    return jnp.broadcast_to(0.5 + 0.5 * jnp.sin(0.37 * pos + step), tokens.shape)  # [B, L]


SOURCE = jax.random.randint(jax.random.PRNGKey(7), (B, L), 0, V)
RNG = jax.random.PRNGKey(3)


@functools.partial(jax.jit, static_argnames=("logits_fn", "attention_fn"))
def _jitted_decode(guidance_scale, region_hold_threshold, *, logits_fn, attention_fn):
    return maskgit.decode(
        logits_fn,
        SOURCE,
        num_steps=STEPS,
        mask_token_id=MASK_ID,
        rng=RNG,
        guidance_scale=guidance_scale,
        region_hold_threshold=region_hold_threshold,
        attention_fn=attention_fn,
    )


def _decode(logits_fn=fake_logits_fn, attention_fn=None, guidance_scale=0.0, region_hold_threshold=0.0):
    """Jitted decode, compiled once per (logits_fn, attention_fn) pair to keep the tests fast."""
    return _jitted_decode(
        jnp.float32(guidance_scale), jnp.float32(region_hold_threshold), logits_fn=logits_fn, attention_fn=attention_fn
    )


def test_region_hold_zero_threshold_equals_plain_decode():
    plain, plain_aux = _decode()
    with_attention, aux = _decode(attention_fn=fake_attention_fn, region_hold_threshold=0.0)
    np.testing.assert_array_equal(plain, with_attention)
    assert int(aux["num_held"].sum()) == 0 and int(plain_aux["num_held"].sum()) == 0


def test_attention_as_third_logits_output_matches_attention_fn():
    def logits_with_scores(tokens, step):
        return (*fake_logits_fn(tokens, step), fake_attention_fn(tokens, step))

    a, aux_a = _decode(logits_fn=logits_with_scores, region_hold_threshold=0.4)
    b, aux_b = _decode(attention_fn=fake_attention_fn, region_hold_threshold=0.4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(aux_a["held"], aux_b["held"])


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_held_tokens_equal_source(threshold):
    tokens, aux = _decode(attention_fn=fake_attention_fn, region_hold_threshold=threshold)
    held = np.asarray(aux["held"])
    assert held.any() and not held.all()
    np.testing.assert_array_equal(np.asarray(tokens)[held], np.asarray(SOURCE)[held])
    np.testing.assert_array_equal(aux["num_held"], held.sum(-1))


def test_threshold_above_all_scores_returns_source():
    tokens, aux = _decode(attention_fn=fake_attention_fn, region_hold_threshold=1.01)
    np.testing.assert_array_equal(tokens, SOURCE)
    assert bool(aux["held"].all())


def test_mask_count_follows_cosine_schedule():
    tokens, aux = _decode()
    num_masked = np.asarray(aux["num_masked"])  # [S, B]
    expected, prev = [], L
    for s in range(STEPS):
        target = math.floor(L * math.cos(math.pi / 2 * (s + 1) / STEPS))
        prev = 0 if s == STEPS - 1 else max(1, min(prev - 1, target))
        expected.append(prev)
    np.testing.assert_array_equal(num_masked, np.repeat(np.array(expected)[:, None], B, axis=1))
    assert np.all(np.diff(num_masked, axis=0) <= 0)
    tokens = np.asarray(tokens)
    assert np.all((tokens >= 0) & (tokens < V)) and not np.any(tokens == MASK_ID)


def test_mask_ratio_cosine_values():
    np.testing.assert_allclose(maskgit.mask_ratio_cosine(0, 2), math.cos(math.pi / 4), rtol=1e-6)
    np.testing.assert_allclose(maskgit.mask_ratio_cosine(1, 2), 0.0, atol=1e-6)


def test_guidance_zero_ignores_uncond():
    def nan_uncond(tokens, step):
        cond, _ = fake_logits_fn(tokens, step)
        return cond, jnp.full_like(cond, jnp.nan)

    def cond_only(tokens, step):
        return fake_logits_fn(tokens, step)[0], None

    a, _ = _decode(logits_fn=nan_uncond, guidance_scale=0.0)
    b, _ = _decode(logits_fn=cond_only)
    c, _ = _decode(guidance_scale=0.0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    guided, _ = _decode(guidance_scale=4.0)
    assert not np.array_equal(guided, a)


def test_decode_jits_with_traced_threshold():
    @jax.jit
    def run(threshold, rng):
        return maskgit.decode(
            fake_logits_fn,
            SOURCE,
            num_steps=STEPS,
            mask_token_id=MASK_ID,
            rng=rng,
            guidance_scale=2.0,
            region_hold_threshold=threshold,
            attention_fn=fake_attention_fn,
        )

    eager_zero, _ = maskgit.decode(
        fake_logits_fn, SOURCE, num_steps=STEPS, mask_token_id=MASK_ID, rng=RNG, guidance_scale=2.0
    )
    jit_zero, _ = run(jnp.float32(0.0), RNG)
    np.testing.assert_array_equal(jit_zero, eager_zero)
    jit_all, aux = run(jnp.float32(1.01), RNG)
    np.testing.assert_array_equal(jit_all, SOURCE)
    assert int(aux["num_held"].sum()) == B * L


def test_threshold_without_attention_raises():
    with pytest.raises(ValueError, match="attention"):
        maskgit.decode(
            fake_logits_fn, SOURCE, num_steps=STEPS, mask_token_id=MASK_ID, rng=RNG, region_hold_threshold=0.5
        )


def test_sample_mask_rate_matches_arccos_distribution():
    r = np.asarray(maskgit.sample_mask_rate(jax.random.PRNGKey(0), (20000,)))
    assert r.min() >= 0.0 and r.max() <= 1.0
    result = stats.kstest(r, lambda x: 2.0 / np.pi * np.arcsin(np.clip(x, 0.0, 1.0)))
    assert result.pvalue > 1e-3, result
    # Histogram check: mass in [0.9, 1] is 1 - (2/pi) arcsin(0.9) ~ 0.287.
    np.testing.assert_allclose(np.mean(r >= 0.9), 1 - 2 / np.pi * np.arcsin(0.9), atol=0.015)


def test_sample_mask_rate_truncated_to_min_rate():
    low = 0.5
    r = np.asarray(maskgit.sample_mask_rate(jax.random.PRNGKey(1), (20000,), min_rate=low))
    assert r.min() >= low and r.max() <= 1.0
    f_low = 2.0 / np.pi * np.arcsin(low)
    truncated_cdf = lambda x: (2.0 / np.pi * np.arcsin(np.clip(x, low, 1.0)) - f_low) / (1.0 - f_low)  # noqa: E731
    assert stats.kstest(r, truncated_cdf).pvalue > 1e-3
    ones = np.asarray(maskgit.sample_mask_rate(jax.random.PRNGKey(2), (64,), min_rate=1.0))
    np.testing.assert_array_equal(ones, 1.0)
    with pytest.raises(ValueError, match="min_rate"):
        maskgit.sample_mask_rate(jax.random.PRNGKey(0), (4,), min_rate=1.5)


def test_sample_categorical_matches_the_tempered_softmax():
    from editing_jax.sampling.maskgit import sample_categorical

    logits = jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4]))
    draws = sample_categorical(jax.random.key(0), jnp.broadcast_to(logits, (20000, 4)), jnp.float32(1.0))
    freqs = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(freqs, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    tempered = np.exp(np.asarray(logits) / 0.5) / np.exp(np.asarray(logits) / 0.5).sum()
    draws = sample_categorical(jax.random.key(1), jnp.broadcast_to(logits, (20000, 4)), jnp.float32(0.5))
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 20000, tempered, atol=0.015)
    greedy = sample_categorical(jax.random.key(2), jnp.broadcast_to(logits, (5, 4)), jnp.float32(0.0))
    assert np.all(np.asarray(greedy) == 3)


def test_token_temperature_is_separate_from_the_remasking_temperature():
    def fixed_logits(tokens, step):
        del step
        return jnp.broadcast_to(_table(0)[None], (*tokens.shape, V)), None

    def decode(token_temperature, temperature):
        kwargs = dict(num_steps=STEPS, mask_token_id=MASK_ID, rng=RNG, temperature=temperature)
        return np.asarray(maskgit.decode(fixed_logits, SOURCE, token_temperature=token_temperature, **kwargs)[0])

    argmax = np.broadcast_to(np.asarray(jnp.argmax(_table(0), axis=-1)), (B, L))
    # Greedy token draws: every token is its argmax however hot the re-masking noise is.
    np.testing.assert_array_equal(decode(0.0, 50.0), argmax)
    # Annealed draws (None) follow the re-masking temperature: hot early steps draw non-argmax tokens.
    assert (decode(None, 50.0) != argmax).mean() > 0.3
    # The reference default (1.0) draws from the softmax itself: mostly, not always, the argmax of a peaked table.
    assert 0.0 < (decode(1.0, 50.0) != argmax).mean() < (decode(None, 50.0) != argmax).mean()
