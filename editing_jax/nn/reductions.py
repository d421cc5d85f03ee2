"""Reductions that XLA:CPU runs slowly in their textbook form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EXACT_FLOAT_INDICES = 2**24  # float32 holds every integer index below this exactly


def argmax_last(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32 (the first index of the maximum), computed as two plain reductions.

    XLA:CPU runs argmax's paired (value, index) reduction 3-4x slower than a max followed by a max of the negated
    indices where the row reaches it (20-23 ms against 5-8 ms for `[4096, 1024]` float32 on 2 cores; the VQ's
    nearest-code search and the EditMGT loss's accuracy take three such argmaxes per training step, docs/RESULTS.md,
    EditMGT: "One code head, and where the step's time goes"). The result equals `jnp.argmax` for rows without NaN,
    ties included; a row holding a NaN gives 0. The maximum is kept out of the second reduction's fusion, which would
    otherwise recompute it.
    """
    size = x.shape[-1]
    if size >= _EXACT_FLOAT_INDICES:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    top = jax.lax.optimization_barrier(jnp.max(x, axis=-1, keepdims=True))  # [..., 1]
    reached = (x >= top) | jnp.isnan(top)  # [..., K]
    negated = -jnp.arange(size, dtype=jnp.float32)  # [K]
    return (-jnp.max(jnp.where(reached, negated, -float(size)), axis=-1)).astype(jnp.int32)
