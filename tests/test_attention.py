"""The attention kernel: float64 reference values and gradients, and the layout of its compiled backward."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.nn.attention import dot_product_attention


def test_dot_product_attention_matches_a_float64_reference_in_value_and_gradient():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 7, 3, 8)) for _ in range(3))
    bias = rng.standard_normal((1, 3, 7, 7))
    q32, k32, v32, bias32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v, bias))
    out, probs = dot_product_attention(q32, k32, v32, bias=bias32, capture_probs=True)
    np.testing.assert_array_equal(dot_product_attention(q32, k32, v32, bias=bias32), out)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias
    reference = np.exp(logits - logits.max(-1, keepdims=True))
    reference /= reference.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", reference, v), rtol=1e-5, atol=1e-6)
    with jax.enable_x64():
        args = tuple(jnp.asarray(x) for x in (q, k, v))
        np.testing.assert_allclose(
            dot_product_attention(*args, bias=jnp.asarray(bias)), np.einsum("bhqk,bkhd->bqhd", reference, v), rtol=1e-12
        )

        def sequence_major(q, k, v):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0) + bias
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

        grads = [
            jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v))), (0, 1, 2))(*args)
            for f in (lambda q, k, v: dot_product_attention(q, k, v, bias=jnp.asarray(bias)), sequence_major)
        ]
        for ours, reference in zip(*grads, strict=True):
            np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)


def _copies_of_size(hlo: str, elements: int) -> int:
    """How many copy or transpose ops of the compiled program write a float32 array of `elements` elements."""
    count = 0
    for line in hlo.splitlines():
        match = re.match(r"\s+(?:ROOT )?%\S+ = f32\[([0-9,]+)\]\S* (copy|transpose)\(", line)
        count += bool(match) and int(np.prod([int(d) for d in match.group(1).split(",")])) == elements
    return count


def test_attention_backward_transposes_no_query_by_key_array():
    # Why the products run head-major (XLA:CPU): jax.nn.dot_product_attention's backward re-lays out the
    # [B, H, Lq, Lk] probabilities; ours transposes only the [B, L, H, Dh] operands.
    batch, length, heads, head_dim = 4, 24, 2, 8
    x = jnp.ones((batch, length, heads, head_dim))
    bias = jnp.zeros((1, 1, length, length))

    def hlo(attention):
        loss = lambda q, k, v: jnp.sum(jnp.tanh(attention(q, k, v, bias=bias)))  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile().as_text()

    square = batch * heads * length * length
    assert _copies_of_size(hlo(jax.nn.dot_product_attention), square) > 0  # the layout checked for is still XLA's
    assert _copies_of_size(hlo(dot_product_attention), square) == 0
