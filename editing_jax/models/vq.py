"""VQ image tokenizer: encoder -> vector quantizer with an EMA codebook -> decoder.

The tokens feed the masked generative transformer (EditMGT). Encoder and decoder are either diffusers-style conv
trunks (`VQModel`'s default, weight-compatible with diffusers' `VQModel`) or parameter-free patch maps: a token is
then the code of one non-overlapping `patch x patch` pixel block and decoding is a lookup, so the tokenizer is
perfectly local (an edit changes only the tokens of the blocks it touches) and the EMA update is online k-means. The codebook is not a parameter: it lives in the
'state' collection and is learned by exponential moving averages of the encoder outputs assigned to each code
(van den Oord et al. 2017, appendix; Razavi et al. 2019), so the optimizer only sees encoder/decoder weights and the
loss only needs the commitment term. Unused codes are restarted from the current batch's encoder outputs
(Dhariwal et al. 2020, "Jukebox"), which keeps codebook usage high without a codebook loss.

Training step contract: `model.apply(variables, images, train=True, mutable=['state'], rngs={'restart': key})`;
the 'restart' stream is only needed when `dead_code_threshold > 0`. With `train=False` the state is read only.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from editing_jax.models.flow_dit import pack_latents, unpack_latents
from editing_jax.nn import conv
from editing_jax.nn.reductions import argmax_last

Dtype = Any


ENCODER_TYPES = ("conv", "patch")
RESTART_SAMPLING = ("uniform", "error")


def _l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), epsilon**2))


def kmeans_plus_plus(rng: jax.Array, vectors: jax.Array, num_codes: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): `num_codes` rows of vectors [N, D] -> [K, D] float32.

    Each new code is drawn with probability proportional to the squared distance to the nearest code drawn so far,
    so rare vectors (small objects, edges) get codes and not only the dominant flat backgrounds. Once every vector
    coincides with a code (fewer distinct vectors than codes), the rest are drawn uniformly (duplicates).
    """
    vectors = vectors.reshape(-1, vectors.shape[-1]).astype(jnp.float32)  # [N, D]
    keys = jax.random.split(rng, num_codes)
    first = vectors[jax.random.randint(keys[0], (), 0, vectors.shape[0])]  # [D]
    codes = jnp.zeros((num_codes, vectors.shape[1]), jnp.float32).at[0].set(first)  # [K, D]
    nearest_sq = jnp.sum(jnp.square(vectors - first), axis=-1)  # [N]

    def draw(index, carry):
        codes, nearest_sq = carry
        total = jnp.sum(nearest_sq)
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(nearest_sq, 1e-30)), 0.0)  # [N]
        logits = jnp.where((total > 0) & (nearest_sq <= 0), -jnp.inf, logits)
        row = vectors[jax.random.categorical(keys[index], logits)]  # [D]
        nearest_sq = jnp.minimum(nearest_sq, jnp.sum(jnp.square(vectors - row), axis=-1))
        return codes.at[index].set(row), nearest_sq

    codes, _ = jax.lax.fori_loop(1, num_codes, draw, (codes, nearest_sq))
    return codes


@jax.custom_jvp
def straight_through(inputs: jax.Array, quantized: jax.Array) -> jax.Array:
    """Returns `quantized` exactly in the forward pass; the derivative is the identity w.r.t. `inputs`.

    Unlike `inputs + stop_gradient(quantized - inputs)` the forward value has no rounding error, so a training-graph
    reconstruction equals decoding the token indices bit for bit.
    """
    del inputs
    return quantized


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, quantized = primals
    inputs_dot, _ = tangents
    return quantized, inputs_dot


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with EMA codebook updates and dead-code restart.

    State ('state' collection):
      codebook [K, D]: the code vectors (unit norm when `l2_normalize`).
      cluster_size [K]: EMA of the number of vectors assigned to each code per step (Laplace-smoothed when used).
      embed_sum [K, D]: EMA of the sum of the vectors assigned to each code; codebook = embed_sum / cluster_size.
      usage [K]: EMA of each code's share of assignments relative to a uniform share (1.0 = used 1/K of the
        time); starts at 1 so a fresh codebook is not restarted at once. Codes below `dead_code_threshold` are dead.

    EMA update (train=True): codes assigned in this batch move to `embed_sum / smoothed_cluster_size`; codes not
    assigned keep their vector exactly (their statistics decay). Statistics start at zero, so a code's first
    assignment moves it to the mean of its vectors. Dead codes are then replaced by encoder outputs of the batch
    drawn without replacement (with replacement if the batch has fewer vectors than codes) using the 'restart' rng
    stream, and their statistics are reset (cluster_size = embed_sum = 0, usage = 1): a restarted code that never
    wins an assignment is dead again after log(threshold) / log(decay) steps (~460 with the defaults).

    Attributes:
      codebook_size: number of codes K.
      code_dim: code dimension D.
      commitment_weight: beta; the returned `commitment_loss` is beta * mean ||z - sg(e)||^2.
      ema_decay: decay of the codebook/usage EMAs.
      ema_epsilon: Laplace smoothing of cluster sizes (avoids dividing by ~0 for rarely used codes).
      l2_normalize: l2-normalize inputs and codes, so the lookup is by cosine similarity.
      dead_code_threshold: restart codes whose relative usage falls below this; 0 disables restarts.
      restart_sampling: 'uniform' draws restart vectors uniformly from the batch; 'error' draws them with
        probability proportional to their squared quantization error (codes go where the codebook is worst).
    """

    codebook_size: int
    code_dim: int
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    l2_normalize: bool = False
    dead_code_threshold: float = 0.01
    restart_sampling: str = "uniform"

    def setup(self):
        if self.restart_sampling not in RESTART_SAMPLING:
            raise ValueError(f"restart_sampling must be one of {RESTART_SAMPLING}, got {self.restart_sampling!r}")
        num_codes, dim = self.codebook_size, self.code_dim

        def init_codebook():
            codes = jax.random.normal(self.make_rng("params"), (num_codes, dim), jnp.float32)
            return _l2_normalize(codes) if self.l2_normalize else codes

        def state(name, init_fn, axes):
            return self.variable("state", name, nn.with_logical_partitioning(init_fn, axes))

        self.codebook = state("codebook", init_codebook, ("codebook", None))
        self.cluster_size = state("cluster_size", lambda: jnp.zeros((num_codes,), jnp.float32), ("codebook",))
        self.embed_sum = state("embed_sum", lambda: jnp.zeros((num_codes, dim), jnp.float32), ("codebook", None))
        self.usage = state("usage", lambda: jnp.ones((num_codes,), jnp.float32), ("codebook",))

    def prepare(self, z: jax.Array) -> jax.Array:
        z = z.astype(jnp.float32)  # Assignments are precision sensitive: always float32.
        return _l2_normalize(z) if self.l2_normalize else z

    def nearest(self, z: jax.Array) -> jax.Array:
        """Indices of the nearest codes (L2, or cosine when `l2_normalize`) for z [..., D] -> [...] int32."""
        return self._nearest_prepared(self.prepare(z))

    def _nearest_prepared(self, z: jax.Array) -> jax.Array:
        flat = z.reshape(-1, self.code_dim)  # [N, D]
        codebook = self.codebook.value  # [K, D]
        scores = jnp.einsum("nd,kd->nk", flat, codebook, precision=jax.lax.Precision.HIGHEST)  # [N, K]
        if not self.l2_normalize:  # argmin ||z - e||^2 = argmax (z.e - ||e||^2 / 2)
            scores = scores - 0.5 * jnp.sum(jnp.square(codebook), axis=-1)
        return argmax_last(scores).reshape(z.shape[:-1])

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors for indices [...] -> [..., D] float32."""
        return jnp.take(self.codebook.value, indices, axis=0)

    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantizes z [B, h, w, D]; returns (straight-through codes [B, h, w, D] float32, aux).

        aux: 'commitment_loss' (weighted by beta), 'indices' [B, h, w] int32, 'perplexity' and 'codebook_usage'
        (fraction of codes used) of this batch's assignments, 'restarted_codes' (codes restarted in this call).
        """
        z = self.prepare(z)  # [B, h, w, D]
        indices = self._nearest_prepared(z)  # [B, h, w]
        quantized = self.lookup(indices)  # [B, h, w, D]
        commitment = self.commitment_weight * jnp.mean(jnp.square(z - jax.lax.stop_gradient(quantized)))

        flat = jax.lax.stop_gradient(z).reshape(-1, self.code_dim)  # [N, D]
        flat_indices = indices.reshape(-1)  # [N]
        counts = jnp.zeros((self.codebook_size,), jnp.float32).at[flat_indices].add(1.0)  # [K]
        probs = counts / flat.shape[0]  # [K]
        perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10))))
        restarted = jnp.zeros((), jnp.int32)
        if train:
            errors = jnp.sum(jnp.square(flat - jax.lax.stop_gradient(quantized).reshape(flat.shape)), axis=-1)  # [N]
            restarted = self._update(flat, flat_indices, counts, errors)
        aux = {
            "commitment_loss": commitment,
            "indices": indices,
            "perplexity": perplexity,
            "codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)),
            "restarted_codes": restarted,
        }
        return straight_through(z, quantized), aux

    def _update(self, flat: jax.Array, flat_indices: jax.Array, counts: jax.Array, errors: jax.Array) -> jax.Array:
        """EMA codebook update and dead-code restart from this batch; returns the number of restarted codes."""
        decay, num_codes = self.ema_decay, self.codebook_size
        num_vectors = flat.shape[0]
        sums = jax.ops.segment_sum(flat, flat_indices, num_segments=num_codes)  # [K, D]
        cluster_size = decay * self.cluster_size.value + (1 - decay) * counts  # [K]
        embed_sum = decay * self.embed_sum.value + (1 - decay) * sums  # [K, D]
        total = jnp.sum(cluster_size)
        smoothed = (cluster_size + self.ema_epsilon) / (total + num_codes * self.ema_epsilon) * total  # [K]
        updated = embed_sum / smoothed[:, None]  # [K, D]
        if self.l2_normalize:
            updated = _l2_normalize(updated)
        used = (counts > 0)[:, None]  # [K, 1]
        codebook = jnp.where(used, updated, self.codebook.value)  # [K, D]
        usage = decay * self.usage.value + (1 - decay) * counts * (num_codes / num_vectors)  # [K]

        if self.dead_code_threshold > 0:
            dead = usage < self.dead_code_threshold  # [K]
            rows = self._restart_rows(self.make_rng("restart"), errors, num_codes)  # [K]
            slot = jnp.cumsum(dead.astype(jnp.int32)) - 1  # [K]: the i-th dead code takes the i-th drawn row
            codebook = jnp.where(dead[:, None], flat[rows[jnp.maximum(slot, 0)]], codebook)
            cluster_size = jnp.where(dead, 0.0, cluster_size)
            embed_sum = jnp.where(dead[:, None], 0.0, embed_sum)
            usage = jnp.where(dead, 1.0, usage)
            restarted = jnp.sum(dead.astype(jnp.int32))
        else:
            restarted = jnp.zeros((), jnp.int32)

        self.codebook.value = codebook
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
        self.usage.value = usage
        return restarted

    def _restart_rows(self, rng: jax.Array, errors: jax.Array, num_codes: int) -> jax.Array:
        """Rows of the batch [N] to restart codes from, best first: [K] int32, without replacement when N >= K."""
        num_vectors = errors.shape[0]
        if self.restart_sampling == "uniform" or num_vectors < num_codes:
            weights = errors if self.restart_sampling == "error" else None
            if weights is not None:
                weights = (weights + 1e-12) / jnp.sum(weights + 1e-12)
            return jax.random.choice(rng, num_vectors, (num_codes,), replace=num_vectors < num_codes, p=weights)
        # Weighted sampling without replacement: top-K of log(weight) + Gumbel noise (Gumbel-top-k trick).
        scores = jnp.log(errors + 1e-12) + jax.random.gumbel(rng, errors.shape)  # [N]
        return jax.lax.top_k(scores, num_codes)[1]


class VQModel(nn.Module):
    """VQ tokenizer: encoder -> 1x1 quant_conv -> quantize -> 1x1 post_quant_conv -> decoder (diffusers' layout).

    Images are float NHWC in [-1, 1]; tokens are a [B, h, w] grid with h = H / `downsample_factor`.

    With `encoder_type='patch'` a token's pre-quantization vector is its `patch_size x patch_size` pixel block
    flattened (no encoder, no quant_conv; code_dim = patch_size**2 * in_channels); with `decoder_type='patch'` a
    code vector is that block (no post_quant_conv, no decoder; code_dim = patch_size**2 * out_channels). Both patch
    maps together leave no parameters: the codebook EMA alone is the tokenizer (online k-means on pixel blocks).

    Attributes:
      encoder_type / decoder_type: 'conv' or 'patch'.
      patch_size: block size of the patch encoder/decoder.
      block_out_channels, layers_per_block, norm_num_groups, use_mid_block, mid_block_attention, norm_type: conv trunk
        (see `editing_jax.nn.conv.Encoder`).
      in_channels / out_channels: image channels.
      latent_channels: channels of the conv encoder output and conv decoder input.
      codebook_size, code_dim, commitment_weight, ema_decay, ema_epsilon, l2_normalize_codes,
        dead_code_threshold, restart_sampling: see `VectorQuantizer`.
      codebook_init: 'normal' (random codes) or 'kmeans++' (seeded from the first training batch's pre-quantization
        vectors by `methods.tokenizer`; the module itself only knows 'normal').
      dtype: activation dtype of the conv trunk (the quantizer always works in float32); param_dtype: weights.
    """

    encoder_type: str = "conv"
    decoder_type: str = "conv"
    patch_size: int = 2
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    use_mid_block: bool = True
    mid_block_attention: bool = True
    norm_type: str = "group"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 64
    codebook_size: int = 1024
    code_dim: int = 16
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    l2_normalize_codes: bool = False
    dead_code_threshold: float = 0.01
    restart_sampling: str = "uniform"
    codebook_init: str = "normal"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        for field in ("encoder_type", "decoder_type"):
            if getattr(self, field) not in ENCODER_TYPES:
                raise ValueError(f"{field} must be one of {ENCODER_TYPES}, got {getattr(self, field)!r}")
        if self.codebook_init not in ("normal", "kmeans++"):
            raise ValueError(f"codebook_init must be 'normal' or 'kmeans++', got {self.codebook_init!r}")
        block_dim = self.patch_size**2
        if self.encoder_type == "patch" and self.code_dim != block_dim * self.in_channels:
            raise ValueError(f"a patch encoder needs code_dim = patch_size**2 * in_channels = "
                             f"{block_dim * self.in_channels}, got {self.code_dim}")  # fmt: skip
        if self.decoder_type == "patch" and self.code_dim != block_dim * self.out_channels:
            raise ValueError(f"a patch decoder needs code_dim = patch_size**2 * out_channels = "
                             f"{block_dim * self.out_channels}, got {self.code_dim}")  # fmt: skip
        conv_factor = 2 ** (len(self.block_out_channels) - 1)
        if self.encoder_type != self.decoder_type and self.patch_size != conv_factor:
            raise ValueError(f"a patch side and a conv side need patch_size = 2**(len(block_out_channels) - 1) = "
                             f"{conv_factor}, got {self.patch_size}")  # fmt: skip
        trunk = conv.trunk_kwargs(self)
        make_conv = functools.partial(conv.make_conv, kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.encoder_type == "conv":
            self.encoder = conv.Encoder(self.latent_channels, **trunk)
            self.quant_conv = make_conv(self.code_dim, name="quant_conv")
        self.quantize = VectorQuantizer(
            self.codebook_size,
            self.code_dim,
            commitment_weight=self.commitment_weight,
            ema_decay=self.ema_decay,
            ema_epsilon=self.ema_epsilon,
            l2_normalize=self.l2_normalize_codes,
            dead_code_threshold=self.dead_code_threshold,
            restart_sampling=self.restart_sampling,
        )
        if self.decoder_type == "conv":
            self.post_quant_conv = make_conv(self.latent_channels, name="post_quant_conv")
            self.decoder = conv.Decoder(self.out_channels, **trunk)

    @property
    def downsample_factor(self) -> int:
        if self.encoder_type == "patch":
            return self.patch_size
        return 2 ** (len(self.block_out_channels) - 1)

    def encode_continuous(self, images: jax.Array) -> jax.Array:
        """Pre-quantization codes: images [B, H, W, 3] -> [B, h, w, code_dim]."""
        if self.encoder_type == "patch":
            batch, height, width, _ = images.shape
            blocks = pack_latents(images.astype(jnp.float32), self.patch_size)  # [B, h*w, P*P*3]
            return blocks.reshape(batch, height // self.patch_size, width // self.patch_size, self.code_dim)
        return self.quant_conv(self.encoder(images))

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Code vectors [B, h, w, code_dim] -> images [B, H, W, 3] (in `dtype`)."""
        if self.decoder_type == "patch":
            batch, grid_h, grid_w, _ = codes.shape
            height, width = grid_h * self.patch_size, grid_w * self.patch_size
            tokens = codes.reshape(batch, grid_h * grid_w, self.code_dim)  # [B, h*w, P*P*3]
            return unpack_latents(tokens, height, width, self.patch_size).astype(self.dtype)
        return self.decoder(self.post_quant_conv(codes))

    def encode(self, images: jax.Array) -> jax.Array:
        """Token indices [B, h, w] int32 of images [B, H, W, 3] in [-1, 1]."""
        return self.quantize.nearest(self.encode_continuous(images))

    def code_vectors(self) -> jax.Array:
        """The codebook `[K, code_dim]` as the quantizer looks codes up (for a patch VQ: each code's pixel block)."""
        return self.quantize.lookup(jnp.arange(self.codebook_size))

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] from token indices [B, h, w]."""
        return self.decode_codes(self.quantize.lookup(indices))

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstructs images [B, H, W, 3]; returns (recon [B, H, W, 3], aux from `VectorQuantizer`).

        With `train=True` the codebook state is updated (needs `mutable=['state']` and, when restarts are on, a
        'restart' rng).
        """
        quantized, aux = self.quantize(self.encode_continuous(images), train=train)  # [B, h, w, code_dim]
        return self.decode_codes(quantized), aux
