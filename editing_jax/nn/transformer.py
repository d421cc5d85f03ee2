"""Flux-style transformer blocks shared by the masked generative transformer and the flow DiT.

`DoubleStreamBlock` equals diffusers' `FluxTransformerBlock` and `SingleStreamBlock` equals
`FluxSingleTransformerBlock` (`models/transformers/transformer_flux.py`) given converted weights
(`editing_jax.convert.flux_blocks`). Submodule names mirror diffusers' state-dict keys with list indices joined by `_`
(`attn.to_out.0` -> `attn/to_out_0`, `ff.net.0.proj` -> `ff/net_0/proj`), so conversion is a name mapping plus kernel
transposes.

The math (adaLN-Zero, Peebles & Xie 2023): `SiLU(temb) -> Dense` gives per-sample shift/scale/gate vectors, in the
order (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) for double blocks and (shift, scale, gate) for
single blocks; tokens are `LayerNorm(x) * (1 + scale) + shift` (no affine, eps 1e-6); branch outputs are added to the
residual times their gate. Attention is joint over the concatenated sequence [text; image; cond] with per-head
RMSNorm on queries and keys (separate weights for text in double blocks) and RoPE; MLPs use tanh-approximated GELU.

Generator-agnostic extras, all off by default and adding nothing to the graph when off:
  * condition tokens (`cond_hidden`, `cond_temb`): e.g. EditMGT's reference image. They share every weight of the
    image stream but get their own modulation from `cond_temb` (EditMGT: the embedding of timestep 0), join the
    attention after the image tokens and are returned updated. The caller's RoPE table covers them too (positions
    equal to the target's for EditMGT, offset for Kontext).
  * `attention_bias`: an additive logit bias over the joint sequence (EditMGT's log(gamma) between token groups).
  * `capture_attention=True`: the block's attention probabilities `[B, H, L, L]` are sown into the
    'intermediates' collection at `attn/attention_probs` (apply with `mutable=['intermediates']`).
  * LoRA (`lora_rank > 0`) on the Dense layers named in `lora_targets` (CogniEdit).

`TextCrossAttention` (not in Flux) is a separate module a model may add after its blocks: image tokens read the text
through their own softmax over [null; text], giving a per-token gate.

Logical axis names for parameters (see `train/sharding.py`): 'embed' (model width), 'mlp' (MLP hidden and the
adaLN modulation output), 'heads' (the flattened heads x head-dim projection), 'kv' (head dim, qk-norm scales).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.nn.attention import apply_rope, dot_product_attention
from editing_jax.nn.conv import constrain_batch

Dtype = Any
Initializer = Callable[..., jax.Array]
Rope = tuple[jax.Array, jax.Array]

# diffusers' Flux blocks use this epsilon for the adaLN LayerNorms and the qk RMSNorms.
NORM_EPSILON = 1e-6
# Sinusoidal features per position axis (`grid_position_features`).
POSITION_FEATURES = 16
# Dense layers that get LoRA adapters by default: the attention projections of both streams.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def matmul_last(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x [..., in] @ kernel [in, out] -> [..., out]`, computed as one `[N, in] @ [in, out]` product.

    The same values as `jnp.dot(x, kernel)`, but for an `x` of rank > 2 XLA:CPU computes the kernel's gradient from a
    transposed copy of the output's gradient; as one rank-2 product it needs none, and the backward pass of a 64 ->
    1,024 layer over `[16, 256]` positions takes a third of the time (docs/RESULTS.md, EditMGT: "Rank-2 products").
    """
    flat = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)  # [N, out]
    return flat.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
    """`x @ kernel + bias` with an optional low-rank adapter (LoRA, Hu et al. 2021).

    With `lora_rank > 0` the output gains `(lora_alpha / lora_rank) * (x @ lora_a) @ lora_b`; `lora_a [in, r]` starts
    normal with variance 1/in and `lora_b [r, out]` starts at zero, so a fresh adapter leaves the layer unchanged.
    The adapter lives next to `kernel`/`bias` in the 'params' collection (select it for training by the leaf names
    `lora_a`/`lora_b`, e.g. with `optax.masked`); with `lora_rank == 0` the parameters equal `nn.Dense`'s.

    Attributes:
      features: output width.
      kernel_axes: logical axis names of the kernel `[in, out]`; the bias uses `kernel_axes[1]`.
      use_bias: whether to add a bias.
      kernel_init: kernel initializer (before logical partitioning).
      lora_rank: adapter rank; 0 disables the adapter.
      lora_alpha: adapter scale numerator (the PEFT convention: scale = alpha / rank).
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    features: int
    kernel_axes: tuple[str | None, str | None] = (None, None)
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kernel_offset: jax.Array | None = None) -> jax.Array:  # x: [..., in]
        """`kernel_offset [in, out]`, if given, is added to the kernel (not to the adapter) for this call."""
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (in_features, self.features),
            self.param_dtype,
        )
        kernel = kernel.astype(self.dtype)
        if kernel_offset is not None:
            kernel = kernel + kernel_offset.astype(self.dtype)
        x = x.astype(self.dtype)
        y = matmul_last(x, kernel)  # [..., out]
        if self.lora_rank > 0:
            lora_a = self.param(
                "lora_a",
                nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "normal"), (self.kernel_axes[0], None)
                ),
                (in_features, self.lora_rank),
                self.param_dtype,
            )
            lora_b = self.param(
                "lora_b",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.kernel_axes[1])),
                (self.lora_rank, self.features),
                self.param_dtype,
            )
            down = matmul_last(x, lora_a.astype(self.dtype))  # [..., r]
            y = y + matmul_last(down, lora_b.astype(self.dtype)) * (self.lora_alpha / self.lora_rank)  # [..., out]
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.kernel_axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def _layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm over the last axis in float32 (`nn.LayerNorm(elementwise_affine=False, eps=1e-6)`)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPSILON)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype) -> jax.Array:
    """`LayerNorm(x) * (1 + scale) + shift` per sample; x: [B, L, D], shift/scale: [B, D]."""
    shift = shift.astype(jnp.float32)[:, None]  # [B, 1, D]
    scale = scale.astype(jnp.float32)[:, None]  # [B, 1, D]
    return (_layer_norm(x) * (1.0 + scale) + shift).astype(dtype)  # [B, L, D]


def _rms_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str, scale_init: float = 1.0) -> nn.RMSNorm:
    """Per-head RMSNorm over the head dim (statistics in float32) with a learned scale (initially `scale_init`)."""
    return nn.RMSNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.constant(scale_init), ("kv",)),
        name=name,
    )


class AdaLNModulation(nn.Module):
    """`SiLU -> Dense(num_chunks * D)` on the conditioning embedding, split into `num_chunks` vectors `[B, D]`.

    This is the `linear` of diffusers' `AdaLayerNormZero` (6 chunks) / `AdaLayerNormZeroSingle` (3 chunks); the
    normalization itself is applied by the block (`modulate`) so one modulation can serve several token groups.
    The kernel and bias start at zero by default (adaLN-Zero: a fresh block is the identity).
    """

    num_chunks: int
    zero_init: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:  # temb: [B, D]
        dim = temb.shape[-1]
        init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.lecun_normal()
        emb = Dense(
            self.num_chunks * dim,
            ("embed", "mlp"),
            kernel_init=init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="linear",
        )(nn.silu(temb.astype(self.dtype)))  # [B, num_chunks * D]
        return jnp.split(emb, self.num_chunks, axis=-1)  # num_chunks x [B, D]


class _GELUProjection(nn.Module):
    """Dense then tanh-approximated GELU (diffusers' `GELU(approximate='tanh')`, the `net.0` of `FeedForward`)."""

    features: int
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, L, D]
        h = Dense(
            self.features,
            ("embed", "mlp"),
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)  # [B, L, F]
        return nn.gelu(h, approximate=True)


class FeedForward(nn.Module):
    """`net_0` (Dense + tanh GELU, D -> hidden) then `net_2` (Dense, hidden -> D), diffusers' `FeedForward`.

    Attributes:
      hidden_features: MLP width (Flux: 4 * D).
      lora_rank, lora_alpha, lora_targets: LoRA on the layers whose local name ('proj', 'net_2') is a target.
    """

    hidden_features: int
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, L, D]
        kwargs = dict(lora_alpha=self.lora_alpha, dtype=self.dtype, param_dtype=self.param_dtype)
        h = _GELUProjection(
            self.hidden_features, lora_rank=_rank_for("proj", self.lora_rank, self.lora_targets), name="net_0", **kwargs
        )(x)  # [B, L, F]
        return Dense(
            x.shape[-1],
            ("mlp", "embed"),
            lora_rank=_rank_for("net_2", self.lora_rank, self.lora_targets),
            name="net_2",
            **kwargs,
        )(h)  # [B, L, D]


def _rank_for(name: str, lora_rank: int, lora_targets: Sequence[str]) -> int:
    return lora_rank if name in lora_targets else 0


class JointAttention(nn.Module):
    """Multi-head attention over several token groups concatenated along the sequence (diffusers' `FluxAttention`).

    Each group is projected with either the main weights (`to_q/to_k/to_v`, `norm_q/norm_k`, `to_out_0`) or, when
    flagged as context, the added weights (`add_q_proj/...`, `norm_added_q/k`, `to_add_out`); queries/keys get
    per-head RMSNorm, then RoPE over the whole concatenation, then one softmax over all keys.

    Attributes:
      num_heads: attention heads.
      head_dim: channels per head.
      out_features: width of the output projections (the model width).
      context_projections: create the added (text-stream) weights (double blocks).
      out_projections: project each group back with `to_out_0`/`to_add_out`; single blocks (diffusers'
        `pre_only=True`) return the concatenated heads `[B, L, H * Dh]` instead.
      qk_norm_eps: RMSNorm epsilon.
      qk_norm_scale_init: initial query/key RMSNorm scale (1 as diffusers). With RMS-normalized queries and keys the
        attention logits are bounded by scale^2 * sqrt(head_dim); a larger start lets a model trained from scratch
        form sharp (e.g. same-position) attention sooner.
      lora_rank, lora_alpha, lora_targets: LoRA on the projections whose name is a target.
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    num_heads: int
    head_dim: int
    out_features: int
    context_projections: bool = False
    out_projections: bool = True
    qk_norm_eps: float = NORM_EPSILON
    qk_norm_scale_init: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, axes: tuple[str, str], name: str) -> Dense:
        return Dense(
            features,
            axes,
            lora_rank=_rank_for(name, self.lora_rank, self.lora_targets),
            lora_alpha=self.lora_alpha,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _norm(self, name: str) -> nn.RMSNorm:
        return _rms_norm(self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                         scale_init=self.qk_norm_scale_init)  # fmt: skip

    def setup(self):
        inner = self.num_heads * self.head_dim
        self.to_q = self._dense(inner, ("embed", "heads"), "to_q")
        self.to_k = self._dense(inner, ("embed", "heads"), "to_k")
        self.to_v = self._dense(inner, ("embed", "heads"), "to_v")
        self.norm_q = self._norm("norm_q")
        self.norm_k = self._norm("norm_k")
        if self.out_projections:
            self.to_out_0 = self._dense(self.out_features, ("heads", "embed"), "to_out_0")
        if self.context_projections:
            self.add_q_proj = self._dense(inner, ("embed", "heads"), "add_q_proj")
            self.add_k_proj = self._dense(inner, ("embed", "heads"), "add_k_proj")
            self.add_v_proj = self._dense(inner, ("embed", "heads"), "add_v_proj")
            self.norm_added_q = self._norm("norm_added_q")
            self.norm_added_k = self._norm("norm_added_k")
            if self.out_projections:
                self.to_add_out = self._dense(self.out_features, ("heads", "embed"), "to_add_out")

    def _heads(self, x: jax.Array) -> jax.Array:  # x: [B, L, H * Dh]
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)  # [B, L, H, Dh]

    def __call__(
        self,
        groups: Sequence[tuple[jax.Array, bool]],
        rope: Rope | None = None,
        bias: jax.Array | None = None,
        capture: bool = False,
    ) -> list[jax.Array]:
        """Attends over the concatenation of `groups`.

        Args:
          groups: `(x [B, L_g, D], is_context)` pairs in sequence order; `is_context` selects the added weights.
          rope: `(cos, sin)`, each `[L, Dh]` or `[B, L, Dh]` with `L = sum(L_g)`; None skips RoPE.
          bias: additive logit bias broadcastable to `[B, H, L, L]`.
          capture: sow the probabilities `[B, H, L, L]` as 'intermediates'/'attention_probs'.

        Returns:
          One output per group, `[B, L_g, out_features]` (or `[B, L_g, H * Dh]` without output projections).
        """
        queries, keys, values = [], [], []
        for x, is_context in groups:
            if is_context and not self.context_projections:
                raise ValueError("a context group needs context_projections=True")
            q_proj, k_proj, v_proj = (
                (self.add_q_proj, self.add_k_proj, self.add_v_proj) if is_context else (self.to_q, self.to_k, self.to_v)
            )
            q_norm, k_norm = (self.norm_added_q, self.norm_added_k) if is_context else (self.norm_q, self.norm_k)
            queries.append(q_norm(self._heads(q_proj(x))))  # [B, L_g, H, Dh]
            keys.append(k_norm(self._heads(k_proj(x))))  # [B, L_g, H, Dh]
            values.append(self._heads(v_proj(x)))  # [B, L_g, H, Dh]
        query = jnp.concatenate(queries, axis=1)  # [B, L, H, Dh]
        key = jnp.concatenate(keys, axis=1)  # [B, L, H, Dh]
        value = jnp.concatenate(values, axis=1)  # [B, L, H, Dh]
        if rope is not None:
            cos, sin = rope
            if cos.shape[-2] != query.shape[1]:
                raise ValueError(
                    f"RoPE table covers {cos.shape[-2]} positions but the joint sequence has {query.shape[1]}"
                )
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)
        if capture:
            out, probs = dot_product_attention(query, key, value, bias=bias, capture_probs=True)
            self.sow("intermediates", "attention_probs", probs)  # [B, H, L, L]
        else:
            out = dot_product_attention(query, key, value, bias=bias)  # [B, L, H, Dh]
        out = out.reshape(*out.shape[:2], -1)  # [B, L, H * Dh]
        outputs, start = [], 0
        for x, is_context in groups:
            part = out[:, start : start + x.shape[1]]  # [B, L_g, H * Dh]
            start += x.shape[1]
            if self.out_projections:
                part = (self.to_add_out if is_context else self.to_out_0)(part)  # [B, L_g, D]
            outputs.append(part)
        return outputs


def _check_cond(cond_hidden: jax.Array | None, cond_temb: jax.Array | None) -> None:
    if (cond_hidden is None) != (cond_temb is None):
        raise ValueError("cond_hidden and cond_temb must be given together")


class _BlockFields(nn.Module):
    """Fields shared by the double- and single-stream blocks (documented on each block)."""

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    qk_norm_eps: float = NORM_EPSILON
    qk_norm_scale_init: float = 1.0
    zero_init_modulation: bool = True
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class DoubleStreamBlock(_BlockFields):
    """Flux double-stream block: separate text/image weights, joint attention (diffusers' `FluxTransformerBlock`).

    Attributes:
      num_heads: attention heads; `num_heads * head_dim` must equal the model width D.
      head_dim: channels per head.
      mlp_ratio: MLP width / D.
      qk_norm_eps: epsilon of the query/key RMSNorms.
      qk_norm_scale_init: initial query/key RMSNorm scale (see `JointAttention`).
      zero_init_modulation: start the adaLN modulation at zero (identity block), the adaLN-Zero recipe.
      lora_rank, lora_alpha, lora_targets: LoRA on the Dense layers whose local name is in `lora_targets`
        (attention: 'to_q', 'to_k', 'to_v', 'to_out_0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out';
        MLPs: 'proj', 'net_2').
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        context: jax.Array,
        temb: jax.Array,
        rope: Rope | None = None,
        *,
        cond_hidden: jax.Array | None = None,
        cond_temb: jax.Array | None = None,
        attention_bias: jax.Array | None = None,
        capture_attention: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Runs the block.

        Args:
          hidden: image tokens `[B, Li, D]`.
          context: text tokens `[B, Lt, D]`.
          temb: conditioning embedding `[B, D]` (timestep + pooled text).
          rope: `(cos, sin)` for the joint sequence [text; image; cond], each `[L, Dh]` or `[B, L, Dh]`.
          cond_hidden: optional condition tokens `[B, Lc, D]` (image-stream weights, own modulation).
          cond_temb: conditioning embedding of the condition tokens `[B, D]`.
          attention_bias: additive logit bias `[B or 1, H or 1, L, L]` over [text; image; cond].
          capture_attention: sow this block's attention probabilities (see the module docstring).

        Returns:
          `(hidden [B, Li, D], context [B, Lt, D], cond [B, Lc, D] or None)`.
        """
        _check_cond(cond_hidden, cond_temb)
        dim = hidden.shape[-1]
        if self.num_heads * self.head_dim != dim:
            raise ValueError(f"num_heads * head_dim = {self.num_heads * self.head_dim} must equal the width {dim}")
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets)
        norm1 = AdaLNModulation(6, self.zero_init_modulation, name="norm1", **kwargs)
        norm1_context = AdaLNModulation(6, self.zero_init_modulation, name="norm1_context", **kwargs)
        attn = JointAttention(
            self.num_heads,
            self.head_dim,
            dim,
            context_projections=True,
            qk_norm_eps=self.qk_norm_eps,
            qk_norm_scale_init=self.qk_norm_scale_init,
            name="attn",
            **lora,
            **kwargs,
        )
        mlp_width = int(dim * self.mlp_ratio)
        ff = FeedForward(mlp_width, name="ff", **lora, **kwargs)
        ff_context = FeedForward(mlp_width, name="ff_context", **lora, **kwargs)

        # (tokens, six modulation vectors, is_context) per group, in joint-sequence order.
        groups = [(context, norm1_context(temb), True), (hidden, norm1(temb), False)]
        if cond_hidden is not None:
            groups.append((cond_hidden, norm1(cond_temb), False))
        attn_inputs = [(modulate(x, mod[0], mod[1], self.dtype), is_context) for x, mod, is_context in groups]
        attn_outputs = attn(attn_inputs, rope, attention_bias, capture_attention)  # per group [B, L_g, D]

        outputs = []
        for (x, mod, is_context), attn_out in zip(groups, attn_outputs, strict=True):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # each [B, D]
            x = x + gate_msa[:, None] * attn_out  # [B, L_g, D]
            ff_out = (ff_context if is_context else ff)(modulate(x, shift_mlp, scale_mlp, self.dtype))
            x = x + gate_mlp[:, None] * ff_out  # [B, L_g, D]
            outputs.append(constrain_batch(x.astype(self.dtype)))
        context_out, hidden_out = outputs[0], outputs[1]
        cond_out = outputs[2] if cond_hidden is not None else None
        return hidden_out, context_out, cond_out


class SingleStreamBlock(_BlockFields):
    """Flux single-stream block: shared weights, parallel attention + MLP (diffusers' `FluxSingleTransformerBlock`).

    Text and image tokens are concatenated ([text; image]) and share one modulation from `temb`; condition tokens
    follow them with their own modulation from `cond_temb`. Attention (no output projection) and the GELU MLP read
    the same normalized tokens; `proj_out` maps their concatenation `[attn, mlp]` back to D.

    Attributes:
      num_heads: attention heads; `num_heads * head_dim` must equal the model width D.
      head_dim: channels per head.
      mlp_ratio: MLP width / D.
      qk_norm_eps: epsilon of the query/key RMSNorms.
      zero_init_modulation: start the adaLN modulation at zero (identity block).
      lora_rank, lora_alpha, lora_targets: LoRA on the Dense layers whose local name is in `lora_targets`
        ('to_q', 'to_k', 'to_v', 'proj_mlp', 'proj_out').
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        context: jax.Array,
        temb: jax.Array,
        rope: Rope | None = None,
        *,
        cond_hidden: jax.Array | None = None,
        cond_temb: jax.Array | None = None,
        attention_bias: jax.Array | None = None,
        capture_attention: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Runs the block; arguments and return value as in `DoubleStreamBlock.__call__`."""
        _check_cond(cond_hidden, cond_temb)
        dim = hidden.shape[-1]
        if self.num_heads * self.head_dim != dim:
            raise ValueError(f"num_heads * head_dim = {self.num_heads * self.head_dim} must equal the width {dim}")
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lora = dict(lora_alpha=self.lora_alpha, **kwargs)
        norm = AdaLNModulation(3, self.zero_init_modulation, name="norm", **kwargs)

        # (tokens, (shift, scale, gate)) per modulation group: [text; image] and the optional cond tokens.
        groups = [(jnp.concatenate([context, hidden], axis=1), norm(temb))]  # [B, Lt + Li, D]
        if cond_hidden is not None:
            groups.append((cond_hidden, norm(cond_temb)))
        normed = jnp.concatenate([modulate(x, mod[0], mod[1], self.dtype) for x, mod in groups], axis=1)  # [B, L, D]

        mlp = Dense(
            int(dim * self.mlp_ratio),
            ("embed", "mlp"),
            lora_rank=_rank_for("proj_mlp", self.lora_rank, self.lora_targets),
            name="proj_mlp",
            **lora,
        )(normed)  # [B, L, F]
        mlp = nn.gelu(mlp, approximate=True)
        attn = JointAttention(
            self.num_heads,
            self.head_dim,
            dim,
            out_projections=False,
            qk_norm_eps=self.qk_norm_eps,
            qk_norm_scale_init=self.qk_norm_scale_init,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_targets=self.lora_targets,
            name="attn",
            **kwargs,
        )
        (attn_out,) = attn([(normed, False)], rope, attention_bias, capture_attention)  # [B, L, D]
        out = Dense(
            dim,
            ("mlp", "embed"),
            lora_rank=_rank_for("proj_out", self.lora_rank, self.lora_targets),
            name="proj_out",
            **lora,
        )(jnp.concatenate([attn_out, mlp], axis=-1))  # [B, L, D]

        outputs, start = [], 0
        for x, (_, _, gate) in groups:
            part = out[:, start : start + x.shape[1]]  # [B, L_g, D]
            start += x.shape[1]
            outputs.append(constrain_batch((x + gate[:, None] * part).astype(self.dtype)))
        text_len = context.shape[1]
        context_out, hidden_out = outputs[0][:, :text_len], outputs[0][:, text_len:]
        cond_out = outputs[1] if cond_hidden is not None else None
        return hidden_out, context_out, cond_out


def grid_position_features(positions: np.ndarray | jax.Array) -> jax.Array:
    """Sinusoidal features of token position ids: `[L, n_axes]` -> `[L, n_axes * POSITION_FEATURES]` float32."""
    from editing_jax.nn.embeddings import timestep_embedding  # embeddings imports this module's Dense

    positions = jnp.asarray(positions, jnp.float32)
    return jnp.concatenate([timestep_embedding(positions[:, axis], POSITION_FEATURES, max_period=100.0)
                            for axis in range(positions.shape[1])], axis=-1)  # fmt: skip


class TextCrossAttention(nn.Module):
    """Image tokens read the text through a softmax of their own, with a learned null key (not in Flux/EditMGT).

    In joint attention an image token's few text keys compete with every image and condition key, and its output
    mixes word states; a per-object edit ("make the red circle blue") needs the *named object's* tokens to receive
    the *instruction's* new attribute while the others receive nothing. Here each image token attends over
    [null; text] only: the null key has a zero value, so `1 - p(null)` is a learned per-token "the text is about me"
    gate, and every text value also carries a projection of the pooled instruction embedding, so a token that matches
    the referring words receives the whole instruction (verb, new attribute), not just the word it matched:

      out_i = to_out(sum_j p_ij (to_v(t_j) + pooled_to_v(pooled)))    with p_i = softmax over [null; text].

    Queries and keys are per-head RMS-normalized (no RoPE); `to_out` starts at zero, so a fresh module adds nothing.
    With `positions`, the queries also see where each token is: a projection (`position_proj`) of sinusoidal features
    of its position ids is added to the normalized tokens before `to_q`, so words like "top left" can be matched by
    position (joint attention's RoPE is relative and gives a token no absolute place).
    The per-token gate `1 - p(null)`, averaged over heads (`[B, Li]`), is sown as 'intermediates'/'text_gate', and
    the text part of the attention, averaged over heads (`[B, Li, Lt]`, rows sum to the gate), as 'text_probs': a
    text->image map per word, which region hold can consolidate like joint attention's.

    Attributes:
      num_heads, head_dim: attention shape.
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        context: jax.Array,
        context_mask: jax.Array,
        pooled: jax.Array,
        positions: np.ndarray | jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns the residual update of the image tokens and their gate.

        Args:
          hidden: image tokens `[B, Li, D]`.
          context: text tokens `[B, Lt, D]`.
          context_mask: `[B, Lt]` bool, real text positions.
          pooled: pooled instruction embedding `[B, P]`.
          positions: optional `[Li, n_axes]` position ids of the image tokens (e.g. `grid_position_ids`).

        Returns:
          `(update [B, Li, D], gate [B, Li])`: the update is to be added to `hidden`; the gate is `1 - p(null)`
          averaged over heads.
        """
        batch, length, dim = hidden.shape
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name: str) -> nn.RMSNorm:
            return _rms_norm(NORM_EPSILON, name=name, **kwargs)

        tokens = _layer_norm(hidden)  # [B, Li, D]
        if positions is not None:
            features = grid_position_features(positions)  # [Li, n_axes * F]
            tokens = tokens + Dense(dim, (None, "embed"), name="position_proj", **kwargs)(features)[None]
        query = Dense(inner, ("embed", "heads"), use_bias=False, name="to_q", **kwargs)(tokens)
        query = norm("norm_q")(query.reshape(batch, length, heads, head_dim))  # [B, Li, H, Dh]
        text = _layer_norm(context)  # [B, Lt, D]
        key = Dense(inner, ("embed", "heads"), use_bias=False, name="to_k", **kwargs)(text)
        key = norm("norm_k")(key.reshape(*context.shape[:2], heads, head_dim))  # [B, Lt, H, Dh]
        value = Dense(inner, ("embed", "heads"), name="to_v", **kwargs)(text)  # [B, Lt, H * Dh]
        value = value + Dense(inner, (None, "heads"), use_bias=False, name="pooled_to_v", **kwargs)(pooled)[:, None]
        value = value.reshape(*context.shape[:2], heads, head_dim)  # [B, Lt, H, Dh]
        null_key = self.param(
            "null_key", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "kv")), (heads, head_dim)
        )  # [H, Dh]

        scale = jnp.float32(head_dim**-0.5)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(context_mask[:, None, None, :], logits, -1e9)  # [B, H, Li, Lt]
        null_logit = jnp.einsum("bqhd,hd->bhq", query, null_key.astype(query.dtype),
                                preferred_element_type=jnp.float32)[..., None] * scale  # fmt: skip
        probs = jax.nn.softmax(jnp.concatenate([null_logit, logits], axis=-1), axis=-1)  # [B, H, Li, 1 + Lt]
        gate = 1.0 - probs[..., 0].mean(axis=1)  # [B, Li]
        self.sow("intermediates", "text_gate", gate)
        self.sow("intermediates", "text_probs", probs[..., 1:].mean(axis=1))  # [B, Li, Lt]
        out = jnp.einsum("bhqk,bkhd->bqhd", probs[..., 1:].astype(value.dtype), value)  # [B, Li, H, Dh]
        out = Dense(dim, ("heads", "embed"), kernel_init=nn.initializers.zeros_init(), name="to_out", **kwargs)(
            out.reshape(batch, length, inner)
        )  # [B, Li, D]
        return constrain_batch(out.astype(self.dtype)), gate


def block_scope_name(layer: int, num_double_blocks: int) -> str:
    """Scope of global block `layer` in a stack of double blocks followed by single blocks (diffusers' names)."""
    if layer < num_double_blocks:
        return f"transformer_blocks_{layer}"
    return f"single_transformer_blocks_{layer - num_double_blocks}"


def stack_captured_attention(intermediates, layers: Sequence[int], num_double_blocks: int) -> jax.Array:
    """Stacks the probabilities sown by `capture_attention=True` for global `layers`: `[N, B, H, L, L]`."""
    probs = []
    for layer in layers:
        sown = intermediates[block_scope_name(layer, num_double_blocks)]["attn"]["attention_probs"]
        probs.append(sown[0] if isinstance(sown, tuple) else sown)
    return jnp.stack(probs)
