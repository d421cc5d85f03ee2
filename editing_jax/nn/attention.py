"""Rotary position embeddings and multi-head dot-product attention with bias and probability-capture hooks.

RoPE follows diffusers' Flux convention (`FluxPosEmbed` + `apply_rotary_emb(use_real=True,
use_real_unbind_dim=-1)`): every position has `n_axes` integer coordinates (Flux: (text/frame, row, column)); axis
`i` owns `axes_dims[i]` channels of each head, with frequencies `theta ** (-2j / axes_dims[i])`; cos/sin are
*interleaved* (each frequency repeated twice, `[c0, c0, c1, c1, ...]`) and the rotation pairs adjacent channels
`(x[2j], x[2j+1]) -> (x[2j] cos - x[2j+1] sin, x[2j+1] cos + x[2j] sin)`.

Attention tensors are laid out `[B, L, H, Dh]` (batch, length, heads, head dim). Logits and the softmax are computed
in float32 whatever the activation dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Additive logit standing in for log(0): exp(-1e9 - max) is exactly 0 in float32.
NEG_INF_BIAS = -1e9


def rope_frequencies(
    position_ids: np.ndarray | jax.Array, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray | jax.Array, np.ndarray | jax.Array]:
    """cos/sin tables for multi-axis RoPE, equal to diffusers' `FluxPosEmbed`.

    A concrete NumPy `position_ids` is evaluated on the host in float64 and rounded once to float32, exactly like
    diffusers (use this for positions known at trace time: they become constants of the compiled graph). A JAX array
    (possibly traced) is evaluated in float32; its angle error is about |angle| * 6e-8, i.e. < 1e-5 for positions
    below ~150.

    Args:
      position_ids: `[L, n_axes]` or `[B, L, n_axes]` (integer or float) coordinates of each token.
      axes_dims: channels per axis; each even, summing to the attention head dim.
      theta: RoPE base.

    Returns:
      `(cos, sin)`, each float32 `[L, head_dim]` or `[B, L, head_dim]` (NumPy for NumPy input).
    """
    if position_ids.shape[-1] != len(axes_dims):
        raise ValueError(f"position_ids has {position_ids.shape[-1]} axes but axes_dims={tuple(axes_dims)}")
    if any(d % 2 for d in axes_dims):
        raise ValueError(f"every RoPE axis dim must be even, got axes_dims={tuple(axes_dims)}")
    on_host = isinstance(position_ids, np.ndarray)
    xp = np if on_host else jnp
    compute_dtype = np.float64 if on_host else np.float32
    positions = xp.asarray(position_ids).astype(np.float32).astype(compute_dtype)  # [..., L, n_axes]
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # [dim/2]
        angles = positions[..., axis, None] * inv_freq.astype(compute_dtype)  # [..., L, dim/2]
        cos_parts.append(xp.repeat(xp.cos(angles), 2, axis=-1))  # [..., L, dim]
        sin_parts.append(xp.repeat(xp.sin(angles), 2, axis=-1))  # [..., L, dim]
    cos = xp.concatenate(cos_parts, axis=-1).astype(np.float32)  # [..., L, head_dim]
    sin = xp.concatenate(sin_parts, axis=-1).astype(np.float32)  # [..., L, head_dim]
    return cos, sin


def grid_position_ids(height: int, width: int, index: int = 0) -> np.ndarray:
    """Flux position ids of a token grid: `(index, row, column)` in raster order, `[height * width, 3]` float32.

    NumPy output keeps RoPE on the exact host path (`rope_frequencies`).
    """
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    index_col = np.full(height * width, index)
    return np.stack([index_col, rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent channel pairs of `x` by the RoPE angles (diffusers' `apply_rotary_emb`, unbind dim -1).

    Args:
      x: `[B, L, H, Dh]` queries or keys.
      cos: `[L, Dh]` or `[B, L, Dh]` from `rope_frequencies`.
      sin: same shape as `cos`.

    Returns:
      `[B, L, H, Dh]` in the dtype of `x` (the rotation itself is computed in float32).
    """
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"RoPE table has {cos.shape[-1]} channels but the head dim is {x.shape[-1]}")
    cos = jnp.asarray(cos, jnp.float32)[..., None, :]  # [(B,) L, 1, Dh]
    sin = jnp.asarray(sin, jnp.float32)[..., None, :]  # [(B,) L, 1, Dh]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B, L, H, Dh/2, 2]
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)  # [B, L, H, Dh]
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    capture_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(Dh) + bias) v, optionally also returning the attention probabilities.

    The products run head-major (`[B, H, L, Dh]`, batch axes leading): on XLA:CPU the sequence-major form of
    `jax.nn.dot_product_attention` transposes the `[B, H, Lq, Lk]` logits and probabilities in the backward pass,
    while here only the small `[B, L, H, Dh]` operands are transposed (`tests/test_attention.py`).

    Args:
      query: `[B, Lq, H, Dh]`.
      key: `[B, Lk, H, Dh]`.
      value: `[B, Lk, H, Dh]`.
      bias: optional additive logit bias broadcastable to `[B, H, Lq, Lk]` (e.g. `[1, 1, Lq, Lk]`); use a large
        negative value or `-inf` to block a query/key pair (a query row must keep at least one finite entry).
      capture_probs: also return the probabilities (float32, or float64 for float64 inputs).

    Returns:
      `out [B, Lq, H, Dh]` (dtype of `value`), or `(out, probs [B, H, Lq, Lk])` when `capture_probs`.
    """
    scale = query.shape[-1] ** -0.5
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [B, H, L, Dh]
    logits_dtype = jnp.promote_types(query.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=logits_dtype)  # [B, H, Lq, Lk]
    logits = logits * scale
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.ndim != 4:
            raise ValueError(f"attention bias must be 4-D (broadcastable to [B, H, Lq, Lk]), got {bias.shape}")
        logits = logits + bias.astype(logits_dtype)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, H, Lq, Lk]
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(value.dtype), value)  # [B, H, Lq, Dh]
    out = jnp.swapaxes(out, 1, 2)  # [B, Lq, H, Dh]
    if not capture_probs:
        return out
    return out, probs


def condition_blind_to_target_bias(text_len: int, image_len: int, cond_len: int) -> np.ndarray:
    """`[L, L]` additive attention bias over [text; target; condition] rows and keys: text and condition queries do
    not see target keys, so those streams are functions of the instruction and the source image alone."""
    total = text_len + image_len + cond_len
    bias = np.zeros((total, total), np.float32)
    target = slice(text_len, text_len + image_len)
    bias[:text_len, target] = NEG_INF_BIAS
    bias[text_len + image_len :, target] = NEG_INF_BIAS
    return bias
