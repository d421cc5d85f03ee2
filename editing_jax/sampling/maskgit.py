"""MaskGIT parallel decoding over VQ tokens, with classifier-free guidance and EditMGT region hold.

The whole sampler is one `jax.lax.scan` over a `SamplerState`; it runs under `jax.jit` with no host work.

Per step s (of S):
  1. logits from `logits_fn` (optionally CFG-combined: uncond + g * (cond - uncond));
  2. sample every unknown position from softmax(logits / T_s), T_s = t0 * (1 - (s + 1) / S) (T_s = 0 is argmax);
     by inverse CDF with one uniform per position: the same distribution as Gumbel-max, without a [B, L, V] noise
     tensor (on CPU drawing that noise costs as much as the model's forward pass);
  3. region hold: newly sampled positions whose attention score a < lambda are reverted to the source tokens and
     become fixed (`held`);
  4. re-mask the least confident free positions (confidence = log p(sample) + T_s * Gumbel), keeping
     `max(1, min(free - 1, floor(L * cos(pi/2 * (s + 1) / S))))` masked; nothing stays masked after the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from editing_jax.nn.reductions import argmax_last

# logits_fn(tokens [B, L] int32, step [] int32) -> (cond [B, L, V], uncond [B, L, V] | None[, scores [B, L]])
LogitsFn = Callable[[jax.Array, jax.Array], tuple]
# attention_fn(tokens [B, L] int32, step [] int32) -> scores [B, L] in [0, 1]
AttentionFn = Callable[[jax.Array, jax.Array], jax.Array]


def mask_ratio_cosine(step: jax.Array | int, num_steps: int) -> jax.Array:
    """Fraction of tokens still masked after `step` (0-based): cos(pi/2 * (step + 1) / num_steps)."""
    progress = (jnp.asarray(step, jnp.float32) + 1.0) / num_steps
    return jnp.cos(0.5 * jnp.pi * progress)


def sample_mask_rate(rng: jax.Array, shape: tuple[int, ...] = (), min_rate: float = 0.0) -> jax.Array:
    """Draws training masking rates r on [min_rate, 1] from the truncated arccos density p(r) ~ (1 - r^2)^(-1/2).

    The CDF on [0, 1] is F(r) = (2/pi) arcsin(r), so inverse-CDF sampling gives r = sin(pi/2 * u) with u ~ U[0, 1).
    This is the same distribution as MaskGIT's r = cos(pi/2 * u), since 1 - u is also uniform. `min_rate` > 0
    truncates the density further: u ~ U[F(min_rate), 1); `min_rate` = 1 masks every token.
    """
    if not 0.0 <= min_rate <= 1.0:
        raise ValueError(f"min_rate must be in [0, 1], got {min_rate}")
    low = 2.0 / math.pi * math.asin(min_rate)
    u = jax.random.uniform(rng, shape, jnp.float32, minval=low, maxval=1.0)
    return jnp.maximum(jnp.sin(0.5 * jnp.pi * u), min_rate)


@flax.struct.dataclass
class SamplerState:
    """Carry of the decoding loop."""

    step: jax.Array  # [] int32
    tokens: jax.Array  # [B, L] int32; mask_token_id where unknown
    unknown: jax.Array  # [B, L] bool; still masked
    rng: jax.Array  # PRNG key
    held: jax.Array  # [B, L] bool; reverted to the source by region hold


def _gumbel(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.gumbel(rng, shape, jnp.float32)


def sample_categorical(rng: jax.Array, logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Samples `[...]` indices from softmax(logits / temperature) over the last axis; temperature 0 is argmax.

    Inverse-CDF sampling with one uniform per row (`temperature` may be traced).
    """
    greedy = argmax_last(logits)
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), axis=-1)  # [..., V]
    cdf = jnp.cumsum(probs, axis=-1)  # [..., V]
    u = jax.random.uniform(rng, logits.shape[:-1], jnp.float32)[..., None] * cdf[..., -1:]  # [..., 1]
    sampled = jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def decode(
    logits_fn: LogitsFn,
    source_tokens: jax.Array,
    *,
    num_steps: int,
    mask_token_id: int,
    rng: jax.Array,
    temperature: float | jax.Array = 2.0,
    token_temperature: float | jax.Array | None = 1.0,
    guidance_scale: float | jax.Array = 0.0,
    region_hold_threshold: float | jax.Array = 0.0,
    attention_fn: AttentionFn | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MaskGIT decoding from all-masked target tokens, with optional CFG and region hold.

    Args:
        logits_fn: `(tokens [B, L], step []) -> (cond [B, L, V], uncond [B, L, V] | None)`. V excludes the mask
            token, so it is never sampled. It may return a third output, attention scores [B, L] in [0, 1], which a
            model gets for free from its forward pass; it is used for region hold when `attention_fn` is None.
        source_tokens: [B, L] int32 tokens of the source image, in [0, V).
        num_steps: number of decoding steps S (static).
        mask_token_id: id written at unknown positions of the tokens passed to `logits_fn`.
        rng: PRNG key.
        temperature: initial temperature t0 of the re-masking noise: step s scales the Gumbel noise added to the
            confidences by t0 * (1 - (s + 1) / S) (the reference schedule, linear from t0 to 0).
        token_temperature: softmax temperature of the token draws (1 as the reference: plain categorical samples;
            0 = argmax); None anneals it with the re-masking temperature instead.
        guidance_scale: CFG scale g; logits = uncond + g * (cond - uncond). 0 disables CFG (cond logits only).
        region_hold_threshold: lambda; newly sampled tokens with score < lambda revert to the source. 0 (scores are
            >= 0) reproduces the plain sampler bit for bit. May be traced.
        attention_fn: optional `(tokens [B, L], step []) -> scores [B, L]`, overriding a third `logits_fn` output.

    Returns:
        tokens: [B, L] int32 decoded tokens.
        aux: `held` [B, L] bool, `num_held` [B] int32, `num_masked` [S, B] int32 (masked count after each step),
            and with attention scores `scores` [S, B, L] float32 (the map each step used).
    """
    source_tokens = source_tokens.astype(jnp.int32)  # [B, L]
    batch, length = source_tokens.shape
    has_attention = attention_fn is not None
    if not has_attention:
        probe = jax.eval_shape(logits_fn, source_tokens, jnp.zeros((), jnp.int32))
        has_attention = len(probe) == 3
    if not has_attention and isinstance(region_hold_threshold, (int, float)) and region_hold_threshold > 0:
        raise ValueError("region_hold_threshold > 0 needs attention scores (attention_fn or a 3rd logits_fn output).")
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    threshold = jnp.asarray(region_hold_threshold, jnp.float32)
    t0 = jnp.asarray(temperature, jnp.float32)

    def body(state: SamplerState, _: Any) -> tuple[SamplerState, jax.Array]:
        step = state.step
        outputs = logits_fn(state.tokens, step)
        cond, uncond = outputs[0], outputs[1]
        logits = cond.astype(jnp.float32)  # [B, L, V]
        if uncond is not None:
            guided = uncond + guidance_scale * (cond - uncond)
            logits = jnp.where(guidance_scale == 0.0, logits, guided.astype(jnp.float32))

        rng, sample_rng, confidence_rng = jax.random.split(state.rng, 3)
        temp = t0 * (1.0 - (step + 1).astype(jnp.float32) / num_steps)  # []
        token_temp = temp if token_temperature is None else jnp.asarray(token_temperature, jnp.float32)
        sampled = sample_categorical(sample_rng, logits, token_temp)  # [B, L]
        sampled = jnp.where(state.unknown, sampled, state.tokens)

        if has_attention:
            scores = attention_fn(state.tokens, step) if attention_fn is not None else outputs[2]  # [B, L]
            newly_held = state.unknown & (scores < threshold)  # [B, L]
        else:
            scores = jnp.zeros(state.tokens.shape, jnp.float32)
            newly_held = jnp.zeros_like(state.unknown)
        sampled = jnp.where(newly_held, source_tokens, sampled)
        free = state.unknown & ~newly_held  # [B, L] candidates for re-masking

        log_probs = jax.nn.log_softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]  # [B, L]
        confidence = confidence + temp * _gumbel(confidence_rng, confidence.shape)
        confidence = jnp.where(free, confidence, jnp.inf)

        num_free = jnp.sum(free, axis=-1)  # [B]
        target = jnp.floor(length * mask_ratio_cosine(step, num_steps)).astype(jnp.int32)
        mask_len = jnp.maximum(1, jnp.minimum(num_free - 1, target))  # [B]
        mask_len = jnp.where(step == num_steps - 1, 0, mask_len)
        sorted_confidence = jnp.sort(confidence, axis=-1)  # [B, L]
        padded = jnp.concatenate([sorted_confidence, jnp.full((batch, 1), jnp.inf)], axis=-1)  # [B, L + 1]
        cutoff = jnp.take_along_axis(padded, mask_len[:, None], axis=-1)  # [B, 1]
        remask = confidence < cutoff  # [B, L]; fixed positions have inf confidence and are never re-masked

        new_state = SamplerState(
            step=step + 1,
            tokens=jnp.where(remask, mask_token_id, sampled).astype(jnp.int32),
            unknown=remask,
            rng=rng,
            held=state.held | newly_held,
        )
        return new_state, (jnp.sum(remask, axis=-1).astype(jnp.int32), scores.astype(jnp.float32))

    init = SamplerState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, length), mask_token_id, jnp.int32),
        unknown=jnp.ones((batch, length), bool),
        rng=rng,
        held=jnp.zeros((batch, length), bool),
    )
    final, (num_masked, scores) = jax.lax.scan(body, init, None, length=num_steps)
    aux = {"held": final.held, "num_held": jnp.sum(final.held, axis=-1).astype(jnp.int32), "num_masked": num_masked}
    if has_attention:
        aux["scores"] = scores
    return final.tokens, aux


__all__ = ["SamplerState", "decode", "mask_ratio_cosine", "sample_categorical", "sample_mask_rate"]
