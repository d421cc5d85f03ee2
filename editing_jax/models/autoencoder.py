"""KL autoencoder (diffusers' `AutoencoderKL` layout) whose latents feed the flow DiT.

encoder -> 1x1 quant_conv -> (mean, logvar) -> sample -> 1x1 post_quant_conv -> decoder, on the conv blocks of
`editing_jax.nn.conv`. The posterior is a diagonal Gaussian; `kl` regularizes it toward N(0, I) so the latent space
is smooth enough to be generated. `scaling_factor`/`shift_factor` follow diffusers: the generator works on
`(latents - shift_factor) * scaling_factor`, which should have roughly unit variance.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from editing_jax.nn import conv

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Per-element KL(N(mean, exp(logvar)) || N(0, 1)) = 0.5 * (mean^2 + exp(logvar) - 1 - logvar), float32."""
    mean, logvar = jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)
    return 0.5 * (jnp.square(mean) + jnp.expm1(logvar) - logvar)  # expm1 keeps the small-logvar terms >= 0.


class AutoencoderKL(nn.Module):
    """Variational autoencoder with a diagonal Gaussian posterior; images float NHWC in [-1, 1].

    Latents are [B, h, w, latent_channels] with h = H / 2**(len(block_out_channels) - 1).

    Attributes:
      block_out_channels, layers_per_block, norm_num_groups, use_mid_block, mid_block_attention: conv trunk
        (see `editing_jax.nn.conv.Encoder`).
      in_channels / out_channels: image channels.
      latent_channels: channels of the latent map.
      use_quant_conv / use_post_quant_conv: the 1x1 convs around the latent (Flux-style VAEs have neither).
      scaling_factor, shift_factor: latent normalization, see `normalize_latents`.
      dtype: activation dtype; param_dtype: weight dtype. Posterior statistics and KL are float32.
    """

    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    use_mid_block: bool = True
    mid_block_attention: bool = True
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        trunk = conv.trunk_kwargs(self)
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = conv.Encoder(2 * self.latent_channels, **trunk)
        if self.use_quant_conv:
            self.quant_conv = conv.make_conv(2 * self.latent_channels, 1, name="quant_conv", **kwargs)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv.make_conv(self.latent_channels, 1, name="post_quant_conv", **kwargs)
        self.decoder = conv.Decoder(self.out_channels, **trunk)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar), each [B, h, w, latent_channels] float32, of images [B, H, W, 3]."""
        moments = self.encoder(images)  # [B, h, w, 2 * latent_channels]
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] (in `dtype`) from raw (unnormalized) latents [B, h, w, latent_channels]."""
        if self.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def normalize_latents(self, latents: jax.Array) -> jax.Array:
        """Raw latents -> the generator's space: (latents - shift_factor) * scaling_factor."""
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `normalize_latents`."""
        return latents / self.scaling_factor + self.shift_factor

    def __call__(self, images: jax.Array, sample_posterior: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstructs images [B, H, W, 3]; returns (recon, aux).

        With `sample_posterior` the decoder sees mean + std * eps (reparameterized, eps from the 'sample' rng
        stream); otherwise the posterior mean. aux: 'kl' (mean over batch and latent elements of the per-element KL
        to N(0, I), so its weight does not depend on resolution), 'mean' and 'logvar' [B, h, w, latent_channels].
        """
        mean, logvar = self.encode(images)
        latents = mean
        if sample_posterior:
            noise = jax.random.normal(self.make_rng("sample"), mean.shape, jnp.float32)
            latents = mean + jnp.exp(0.5 * logvar) * noise  # [B, h, w, latent_channels]
        aux = {"kl": jnp.mean(gaussian_kl(mean, logvar)), "mean": mean, "logvar": logvar}
        return self.decode(latents), aux
