"""Timestep / pooled-text embeddings shared by the MGT and the flow DiT (diffusers' `embeddings.py` semantics).

Submodule names mirror diffusers' state-dict keys (`linear_1`, `linear_2`, `timestep_embedder`, `text_embedder`)
so converted weights drop in.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from editing_jax.nn.transformer import Dense

Dtype = Any


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `get_timestep_embedding`.

    Args:
      timesteps: `[N]` values.
      dim: output width.
      flip_sin_to_cos: order (cos, sin) instead of (sin, cos).
      downscale_freq_shift: frequency exponent denominator is `half - downscale_freq_shift`.
      scale: multiplies the arguments.
      max_period: lowest frequency is 1 / max_period.

    Returns:
      `[N, dim]` float32 embedding (zero-padded by one column when `dim` is odd).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale  # [N, half]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # [N, 2 * half]
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """`linear_2(SiLU(linear_1(x)))` (diffusers' `TimestepEmbedding` with act 'silu')."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, C]
        kwargs = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.features, (None, "embed"), name="linear_1", **kwargs)(x)
        return Dense(self.features, (None, "embed"), name="linear_2", **kwargs)(nn.silu(x))  # [B, D]


class TextProjection(nn.Module):
    """`linear_2(SiLU(linear_1(x)))` on pooled text (diffusers' `PixArtAlphaTextProjection`, act 'silu')."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, C]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.features, (None, "embed"), name="linear_1", **kwargs)(x)
        return Dense(self.features, (None, "embed"), name="linear_2", **kwargs)(nn.silu(x))  # [B, D]


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb = TimestepEmbedding(sinusoid_256(t)) + TextProjection(pooled) (diffusers' class of the same name).

    With `guidance_embeds`, a second sinusoid/MLP of the guidance scale is added (diffusers'
    `CombinedTimestepGuidanceTextProjEmbeddings`). Timesteps are used as given (callers scale [0, 1] by 1000).
    """

    features: int
    guidance_embeds: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        temb = TimestepEmbedding(self.features, name="timestep_embedder", **kwargs)(
            timestep_embedding(timestep, 256).astype(self.dtype)
        )  # [B, D]
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this embedding was built with guidance_embeds=True; pass guidance")
            temb = temb + TimestepEmbedding(self.features, name="guidance_embedder", **kwargs)(
                timestep_embedding(guidance, 256).astype(self.dtype)
            )
        return temb + TextProjection(self.features, name="text_embedder", **kwargs)(pooled)  # [B, D]
