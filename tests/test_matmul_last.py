import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editing_jax.nn.transformer import matmul_last


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5), (2, 2, 3, 5)])
def test_matmul_last_equals_dot_in_value_and_gradient(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape))
    kernel = jnp.asarray(rng.normal(size=(5, 7)))
    with jax.enable_x64():
        x64, kernel64 = x.astype(jnp.float64), kernel.astype(jnp.float64)
        np.testing.assert_allclose(matmul_last(x64, kernel64), jnp.dot(x64, kernel64), rtol=1e-12)
        grads = [jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x64, kernel64)
                 for f in (matmul_last, jnp.dot)]  # fmt: skip
        for ours, reference in zip(*grads, strict=True):
            np.testing.assert_allclose(ours, reference, rtol=1e-12)
    assert matmul_last(x, kernel).shape == (*shape[:-1], 7)


def _transposed_copies_of(hlo: str, rows: int, cols: int) -> int:
    """How many ops of the compiled program write an f32[rows, ...] array holding cols elements per row."""
    count = 0
    for line in hlo.splitlines():
        match = re.match(r"\s+(?:ROOT )?%\S+ = f32\[([0-9,]+)\]\S* (copy|transpose|fusion)\(", line)
        if match:
            dims = [int(d) for d in match.group(1).split(",")]
            count += dims[0] == rows and int(np.prod(dims[1:])) == cols
    return count


def test_matmul_last_kernel_gradient_needs_no_transposed_copy_of_the_output_gradient():
    # The reason matmul_last exists (XLA:CPU): a rank-4 jnp.dot's kernel gradient copies the [.., 1024] output
    # gradient into a [1024, ..] layout; the rank-2 product reads it as it is.
    x = jnp.ones((4, 8, 8, 16))
    kernel = jnp.ones((16, 1024))

    def hlo(f):
        loss = lambda k: jnp.sum(jnp.tanh(f(x, k)))  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(kernel).compile().as_text()

    assert _transposed_copies_of(hlo(jnp.dot), 1024, 256) > 0  # the layout the check looks for is still XLA's
    assert _transposed_copies_of(hlo(matmul_last), 1024, 256) == 0
