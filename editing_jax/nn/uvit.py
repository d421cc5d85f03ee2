"""Token-grid pieces of Meissonic / EditMGT's MGT, matching diffusers' `UVit2DModel` components.

* `ConvEmbed` = `UVit2DConvEmbed`: token id -> embedding -> RMSNorm -> 1x1 conv.
* `ConvMlmLayer` = `ConvMlmLayer`: 1x1 conv -> RMSNorm -> 1x1 conv to codebook logits.
* `Downsample` / `Upsample` = `Downsample2D(use_conv, kernel 2, norm 'rms_norm')` /
  `Upsample2D(use_conv_transpose, kernel 2, norm 'rms_norm')` as Meissonic's `Simple_UVitBlock` uses them.

Tensors are NHWC here (PyTorch's are NCHW); a 1x1 conv is a Dense over channels. Parameter names follow the
PyTorch state dict (`embeddings`, `layer_norm`, `conv`, `conv1`, `conv2`, `norm`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from editing_jax.nn.transformer import Dense

Dtype = Any
RMS_EPSILON = 1e-6


def rms_norm(
    name: str | None = None, *, affine: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
):
    """diffusers' `RMSNorm(dim, eps=1e-6, elementwise_affine)` over the last axis (statistics in float32)."""
    return nn.RMSNorm(
        epsilon=RMS_EPSILON,
        use_scale=affine,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        name=name,
    )


class ConvEmbed(nn.Module):
    """Token ids `[B, H, W]` -> features `[B, H, W, features]` (diffusers' `UVit2DConvEmbed`)."""

    vocab_size: int
    embed_dim: int
    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embeddings",
        )
        x = table(ids)  # [B, H, W, E]
        x = rms_norm("layer_norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return Dense(
            self.features,
            (None, "embed"),
            use_bias=self.use_bias,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)  # [B, H, W, features]


class ConvMlmLayer(nn.Module):
    """Features `[B, H, W, C]` -> logits `[B, H, W, codebook_size]` (diffusers' `ConvMlmLayer`)."""

    embed_dim: int
    codebook_size: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kernel_offset: jax.Array | None = None) -> jax.Array:
        """`kernel_offset [E, V]`, if given, is added to the output kernel (MaskedGenerativeTransformer.fused_code_head)."""
        kwargs = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.embed_dim, ("embed", None), name="conv1", **kwargs)(x)  # [B, H, W, E]
        x = rms_norm("layer_norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return Dense(self.codebook_size, (None, "vocab"), name="conv2", **kwargs)(x, kernel_offset)  # [B, H, W, V]


class Downsample(nn.Module):
    """RMSNorm then a 2x2 stride-2 conv: `[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]`.

    Like diffusers' `Downsample2D(padding=0)`, the input is zero-padded by one row/column at the bottom/right first;
    for even H, W the padding is never read.
    """

    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = rms_norm("norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.Conv(
            channels,
            (2, 2),
            strides=(2, 2),
            padding=((0, 1), (0, 1)),
            use_bias=self.use_bias,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """RMSNorm then a 2x2 stride-2 transposed conv: `[B, H, W, C] -> [B, 2H, 2W, C]`.

    A kernel-2 stride-2 transposed conv writes disjoint 2x2 blocks, so it is a Dense to `4 C` followed by a
    depth-to-space; the kernel is stored as `[C_in, 2, 2, C_out]` (torch `ConvTranspose2d` is `[C_in, C_out, 2, 2]`).
    """

    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        x = rms_norm("norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            (channels, 2, 2, channels),
            self.param_dtype,
        )
        y = jnp.einsum("bhwc,cijd->bhiwjd", x.astype(self.dtype), kernel.astype(self.dtype))  # [B, H, 2, W, 2, C]
        y = y.reshape(batch, 2 * height, 2 * width, channels)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                (channels,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
