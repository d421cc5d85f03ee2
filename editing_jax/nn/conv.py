"""Convolutional encoder/decoder blocks shared by the VQ tokenizer and the KL autoencoder.

The layout follows diffusers' VAE `Encoder`/`Decoder` (`models/autoencoders/vae.py`, `resnet.py`,
`unets/unet_2d_blocks.py`) module for module, and submodule names mirror diffusers' state-dict keys with `.` in
lists replaced by `_` (`down_blocks.0.resnets.1.norm1` -> `down_blocks_0/resnets_1/norm1`), so converting a
diffusers safetensors checkpoint is a name mapping plus kernel transposes (torch OIHW -> flax HWIO, GroupNorm
`weight` -> `scale`). Activations are NHWC.

Logical axis names (map them to mesh axes with the config's `logical_axis_rules`, see `train/sharding.py`):
  'conv_in'   input channels of a conv kernel [kh, kw, conv_in, conv_out]; usually unsharded.
  'conv_out'  output channels of a conv kernel, conv biases, and GroupNorm scale/bias; e.g. sharded over 'fsdp'.
  'embed'     channel dimension entering/leaving the mid-block attention (to_q/to_k/to_v inputs, to_out outputs).
  'kv'        the attention's projected (query/key/value) dimension; usually unsharded.
  'batch'     activation batch dimension (constraints at block boundaries).

Every layer takes `dtype` (activations and computation) and `param_dtype` (stored weights), so e.g. bfloat16
activations with float32 weights are a config switch. Normalization statistics and the attention softmax are
computed in float32 regardless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# diffusers' VAE uses this epsilon for every GroupNorm.
NORM_EPSILON = 1e-6

_CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
_CONV_BIAS_AXES = ("conv_out",)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Marks the leading axis as the batch (sharded per the 'batch' rule); a no-op outside a mesh."""
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def make_conv(
    features: int,
    kernel_size: int,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    strides: int = 1,
    padding: str | Sequence[tuple[int, int]] | None = None,
) -> nn.Conv:
    """A square conv with logically partitioned kernel/bias; default padding keeps the spatial size (stride 1)."""
    if padding is None:
        half = kernel_size // 2
        padding = ((half, half), (half, half))
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), _CONV_BIAS_AXES),
        name=name,
    )


def make_group_norm(num_groups: int, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm over the channel axis (statistics in float32) with logically partitioned scale/bias."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=NORM_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), _CONV_BIAS_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), _CONV_BIAS_AXES),
        name=name,
    )


def _dense(features: int, axes: tuple[str, str], *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


NORM_TYPES = ("group", "layer")


def _norm(norm_type: str, num_groups: int, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
    """GroupNorm (diffusers), or a per-pixel LayerNorm over channels ('layer').

    GroupNorm statistics span the whole image, so a local edit shifts every token's features (and flips some codes);
    'layer' keeps each output a function of its receptive field only.
    """
    if norm_type == "group":
        return make_group_norm(num_groups, dtype=dtype, param_dtype=param_dtype, name=name)
    if norm_type == "layer":
        return nn.LayerNorm(
            epsilon=1e-6,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            name=name,
        )
    raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a residual (1x1 `conv_shortcut` when the channels change).

    Attributes:
      out_channels: channels of the output.
      norm_num_groups: GroupNorm groups; must divide the input and output channels.
    """

    out_channels: int
    norm_num_groups: int
    norm_type: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C_in]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        h = _norm(self.norm_type, self.norm_num_groups, name="norm1", **kwargs)(x)
        h = make_conv(self.out_channels, 3, name="conv1", **kwargs)(nn.silu(h))  # [B, H, W, C_out]
        h = _norm(self.norm_type, self.norm_num_groups, name="norm2", **kwargs)(h)
        h = make_conv(self.out_channels, 3, name="conv2", **kwargs)(nn.silu(h))  # [B, H, W, C_out]
        if x.shape[-1] != self.out_channels:
            residual = make_conv(self.out_channels, 1, name="conv_shortcut", **kwargs)(x)  # [B, H, W, C_out]
        return (residual + h).astype(self.dtype)


class Downsample2D(nn.Module):
    """Halves H and W with a stride-2 3x3 conv after diffusers' asymmetric zero padding (bottom/right by one)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C]
        conv = make_conv(
            self.out_channels,
            3,
            strides=2,
            padding=((0, 1), (0, 1)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )
        return conv(x)  # [B, H/2, W/2, C_out]


class Upsample2D(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv (diffusers' `Upsample2D`)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        conv = make_conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        return conv(x)  # [B, 2H, 2W, C_out]


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual (the VAE mid-block attention).

    Matches diffusers' `Attention(..., heads=1, residual_connection=True, _from_deprecated_attn_block=True)`:
    GroupNorm, q/k/v projections to the channel width, softmax(q k^T / sqrt(C)) v, `to_out_0`, plus the input.
    """

    norm_num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C]
        batch, height, width, channels = x.shape
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = make_group_norm(self.norm_num_groups, name="group_norm", **kwargs)(x)
        h = h.reshape(batch, height * width, channels)  # [B, L, C]
        query = _dense(channels, ("embed", "kv"), name="to_q", **kwargs)(h)  # [B, L, C]
        key = _dense(channels, ("embed", "kv"), name="to_k", **kwargs)(h)  # [B, L, C]
        value = _dense(channels, ("embed", "kv"), name="to_v", **kwargs)(h)  # [B, L, C]
        logits = jnp.einsum("bqc,bkc->bqk", query, key, preferred_element_type=jnp.float32)  # [B, L, L]
        weights = jax.nn.softmax(logits * channels**-0.5, axis=-1).astype(self.dtype)  # [B, L, L]
        h = jnp.einsum("bqk,bkc->bqc", weights, value)  # [B, L, C]
        h = _dense(channels, ("kv", "embed"), name="to_out_0", **kwargs)(h)  # [B, L, C]
        return (x + h.reshape(batch, height, width, channels)).astype(self.dtype)


class MidBlock2D(nn.Module):
    """resnet -> (optional) self-attention -> resnet at the lowest resolution (diffusers' `UNetMidBlock2D`)."""

    norm_num_groups: int
    attention: bool = True
    norm_type: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = ResnetBlock2D(channels, self.norm_num_groups, self.norm_type, name="resnets_0", **kwargs)(x)
        if self.attention:
            x = SpatialSelfAttention(self.norm_num_groups, name="attentions_0", **kwargs)(x)
        return ResnetBlock2D(channels, self.norm_num_groups, self.norm_type, name="resnets_1", **kwargs)(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets at one resolution, then an optional 2x downsample."""

    out_channels: int
    num_layers: int
    norm_num_groups: int
    add_downsample: bool
    norm_type: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C_in]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.norm_num_groups, self.norm_type, name=f"resnets_{i}", **kwargs)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, name="downsamplers_0", **kwargs)(x)  # [B, H/2, W/2, C_out]
        return constrain_batch(x)


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets at one resolution, then an optional 2x upsample."""

    out_channels: int
    num_layers: int
    norm_num_groups: int
    add_upsample: bool
    norm_type: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C_in]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.norm_num_groups, self.norm_type, name=f"resnets_{i}", **kwargs)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kwargs)(x)  # [B, 2H, 2W, C_out]
        return constrain_batch(x)


class Encoder(nn.Module):
    """Images -> latent feature map, downsampled by 2**(len(block_out_channels) - 1).

    Attributes:
      out_channels: channels of the output map (2 * latent channels for a KL autoencoder's mean and log-variance).
      block_out_channels: channels of each resolution level, finest first.
      layers_per_block: resnets per level.
      norm_num_groups: GroupNorm groups; must divide every entry of `block_out_channels`.
      use_mid_block: whether to run the resnet/attention/resnet block at the lowest resolution.
      mid_block_attention: whether the mid block has its self-attention layer.
      norm_type: 'group' (diffusers) or 'layer' (per-pixel, keeps latents local; see `_norm`).
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_mid_block: bool = True
    mid_block_attention: bool = True
    norm_type: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, H, W, C_img]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain_batch(x)
        x = make_conv(self.block_out_channels[0], 3, name="conv_in", **kwargs)(x)  # [B, H, W, C_0]
        num_levels = len(self.block_out_channels)
        for i, channels in enumerate(self.block_out_channels):
            x = DownEncoderBlock2D(
                channels,
                self.layers_per_block,
                self.norm_num_groups,
                add_downsample=i < num_levels - 1,
                norm_type=self.norm_type,
                name=f"down_blocks_{i}",
                **kwargs,
            )(x)
        # x: [B, h, w, C_last] with h = H / 2**(num_levels - 1)
        if self.use_mid_block:
            x = MidBlock2D(self.norm_num_groups, self.mid_block_attention, self.norm_type, name="mid_block", **kwargs)(
                x
            )
        x = nn.silu(_norm(self.norm_type, self.norm_num_groups, name="conv_norm_out", **kwargs)(x))
        x = make_conv(self.out_channels, 3, name="conv_out", **kwargs)(x)  # [B, h, w, out_channels]
        return constrain_batch(x)


class Decoder(nn.Module):
    """Latent feature map -> images, upsampled by 2**(len(block_out_channels) - 1); mirrors `Encoder`.

    Level i of the decoder (`up_blocks_i`) works at `reversed(block_out_channels)[i]` channels and has
    `layers_per_block + 1` resnets, as in diffusers.
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_mid_block: bool = True
    mid_block_attention: bool = True
    norm_type: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:  # z: [B, h, w, C_latent]
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain_batch(z)
        x = make_conv(self.block_out_channels[-1], 3, name="conv_in", **kwargs)(x)  # [B, h, w, C_last]
        if self.use_mid_block:
            x = MidBlock2D(self.norm_num_groups, self.mid_block_attention, self.norm_type, name="mid_block", **kwargs)(
                x
            )
        num_levels = len(self.block_out_channels)
        for i, channels in enumerate(reversed(self.block_out_channels)):
            x = UpDecoderBlock2D(
                channels,
                self.layers_per_block + 1,
                self.norm_num_groups,
                add_upsample=i < num_levels - 1,
                norm_type=self.norm_type,
                name=f"up_blocks_{i}",
                **kwargs,
            )(x)
        # x: [B, H, W, C_0] with H = h * 2**(num_levels - 1)
        x = nn.silu(_norm(self.norm_type, self.norm_num_groups, name="conv_norm_out", **kwargs)(x))
        x = make_conv(self.out_channels, 3, name="conv_out", **kwargs)(x)  # [B, H, W, out_channels]
        return constrain_batch(x)


def trunk_kwargs(model: nn.Module) -> dict:
    """Encoder/Decoder keyword arguments from a model that declares the trunk fields (VQModel, AutoencoderKL)."""
    return dict(
        block_out_channels=tuple(model.block_out_channels),
        layers_per_block=model.layers_per_block,
        norm_num_groups=model.norm_num_groups,
        use_mid_block=model.use_mid_block,
        mid_block_attention=model.mid_block_attention,
        norm_type=getattr(model, "norm_type", "group"),
        dtype=model.dtype,
        param_dtype=model.param_dtype,
    )
