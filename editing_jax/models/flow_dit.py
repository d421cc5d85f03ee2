"""Flux/Kontext-style rectified-flow transformer over packed KL-autoencoder latents.

`FlowDiT` equals diffusers' `FluxTransformer2DModel` (`models/transformers/transformer_flux.py`) given weights
converted by `editing_jax.convert.flux_transformer`. Submodule names mirror diffusers' state-dict keys with list
indices joined by `_` (`transformer_blocks.3` -> `transformer_blocks_3`, `time_text_embed.timestep_embedder.linear_1`
-> `time_text_embed/timestep_embedder/linear_1`).

Forward pass:
  packed latents [B, L, C_in] --x_embedder--> image tokens [B, L, D];
  text states [B, Lt, D_text] --context_embedder--> text tokens [B, Lt, D];
  temb = timestep_embedder(sinusoid_256(1000 t)) [+ guidance_embedder(sinusoid_256(1000 g))] + text_embedder(pooled);
  RoPE over the ids of [text; image (; reference)];
  double-stream blocks, single-stream blocks, norm_out (AdaLayerNormContinuous: LayerNorm * (1 + scale) + shift from
  SiLU(temb)), proj_out -> velocity [B, L, C_out].

Kontext-style editing (FLUX.1 Kontext, diffusers' `FluxKontextPipeline`): the reference image's packed latents are
appended after the target tokens, share every weight and the timestep embedding, carry their own position ids
(`latent_image_ids(h, w, index=1)`: first coordinate 1) and their outputs are dropped. This is literally the same
computation as diffusers with the tokens and ids concatenated.

Velocity convention: diffusers' Flux predicts `noise - data` for x_t = (1 - t) data + t noise, the convention of
`editing_jax.sampling.flow`; `timestep` is t in [0, 1] (multiplied by 1000 inside, as diffusers does).

LoRA (CogniEdit): `lora_rank > 0` puts adapters on the block Dense layers named in `lora_targets` (see
`nn.transformer`). `lora_param_mask` selects them for the optimizer, `merge_lora` folds them into the kernels (for a
`lora_rank=0` model), and `zero_lora` (same model) or `strip_lora` (a `lora_rank=0` model) gives the adapter-free
reference policy.

Dynamic Token Focus Relocation (CogniEdit): `token_focus_tokens > 0` puts a `models.token_focus.TokenFocus` before
each block in `token_focus_layers` (empty = every block); it replaces a predicted window of the text stream with
learned soft tokens (`txt_mask` keeps the window inside the real text).

Logical axis names: 'embed' (model width), 'mlp' (MLP hidden and adaLN modulation outputs), 'heads', 'kv' (see the
blocks); input/output channel axes are unnamed (replicated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.models.token_focus import TokenFocus, focus_module_name
from editing_jax.nn.attention import condition_blind_to_target_bias, grid_position_ids, rope_frequencies
from editing_jax.nn.embeddings import CombinedTimestepTextProjEmbeddings
from editing_jax.nn.transformer import (
    DEFAULT_LORA_TARGETS,
    AdaLNModulation,
    Dense,
    DoubleStreamBlock,
    SingleStreamBlock,
    TextCrossAttention,
    block_scope_name,
    modulate,
    stack_captured_attention,
)

Dtype = Any
PositionIds = np.ndarray | jax.Array
Params = Mapping[str, Any]

LORA_LEAVES = ("lora_a", "lora_b")


def pack_latents(latents: jax.Array, patch: int = 2) -> jax.Array:
    """Packs `patch x patch` latent patches into tokens, as diffusers' `FluxPipeline._pack_latents`.

    Channels of a token are ordered (channel, patch row, patch column), which is diffusers' order for NCHW latents
    (`view(B, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5)`), so converted `x_embedder` weights apply unchanged.

    Args:
      latents: `[B, H, W, C]` autoencoder latents (NHWC); H and W divisible by `patch`.
      patch: patch size (Flux: 2).

    Returns:
      `[B, (H / patch) * (W / patch), C * patch * patch]` tokens in raster order.
    """
    batch, height, width, channels = latents.shape
    if height % patch or width % patch:
        raise ValueError(f"latent grid {height}x{width} is not divisible by the patch size {patch}")
    x = latents.reshape(batch, height // patch, patch, width // patch, patch, channels)  # [B, h, p, w, p, C]
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, h, w, C, p, p]
    return x.reshape(batch, (height // patch) * (width // patch), channels * patch * patch)  # [B, h*w, C*p*p]


def unpack_latents(tokens: jax.Array, height: int, width: int, patch: int = 2) -> jax.Array:
    """Inverse of `pack_latents` (diffusers' `FluxPipeline._unpack_latents`, NHWC output).

    Args:
      tokens: `[B, (H / patch) * (W / patch), C * patch * patch]`.
      height: latent height H (not pixels).
      width: latent width W.
      patch: patch size.

    Returns:
      `[B, H, W, C]` latents.
    """
    batch, length, features = tokens.shape
    grid_h, grid_w = height // patch, width // patch
    if height % patch or width % patch or length != grid_h * grid_w or features % (patch * patch):
        raise ValueError(
            f"cannot unpack {length} tokens of {features} channels into a {height}x{width} grid with patch {patch}"
        )
    channels = features // (patch * patch)
    x = tokens.reshape(batch, grid_h, grid_w, channels, patch, patch)  # [B, h, w, C, p, p]
    x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, h, p, w, p, C]
    return x.reshape(batch, height, width, channels)  # [B, H, W, C]


def latent_image_ids(height: int, width: int, index: int = 0) -> np.ndarray:
    """Flux position ids of a packed token grid: `(index, row, column)` in raster order.

    As diffusers' `_prepare_latent_image_ids(batch, height, width)`, where `height`/`width` are the *packed* grid
    (latent size / 2). Kontext's reference image uses `index=1`. NumPy output keeps RoPE on the exact host path.

    Returns:
      `[height * width, 3]` float32.
    """
    return grid_position_ids(height, width, index)


def _concat_ids(ids: Sequence[PositionIds]) -> PositionIds:
    """Concatenates position ids along the sequence; stays NumPy (host RoPE, graph constants) when all are."""
    if all(isinstance(x, np.ndarray) for x in ids):
        return np.concatenate([x.astype(np.float32) for x in ids], axis=-2)
    return jnp.concatenate([jnp.asarray(x, jnp.float32) for x in ids], axis=-2)


class FlowDiT(nn.Module):
    """Flux-style rectified-flow transformer (diffusers' `FluxTransformer2DModel`) with Kontext reference tokens.

    Attributes:
      num_layers: double-stream blocks (Flux: 19).
      num_single_layers: single-stream blocks (Flux: 38).
      num_heads: attention heads; the width is D = num_heads * head_dim.
      head_dim: channels per head (Flux: 128).
      axes_dims_rope: RoPE channels per position axis, summing to head_dim (Flux: (16, 56, 56)).
      out_channels: velocity channels per token; None means the input's channel count (diffusers' default).
      guidance_embeds: add an embedding of the guidance scale (guidance-distilled models, e.g. FLUX.1-dev/Kontext).
      rope_theta: RoPE base.
      mlp_ratio: MLP width / D.
      zero_init_modulation: adaLN-Zero init of the blocks' and norm_out's modulation (training from scratch).
      zero_init_output: zero-init `proj_out` (the DiT recipe: a fresh model predicts zero velocity).
      lora_rank, lora_alpha, lora_targets: LoRA on the block Dense layers whose local name is a target
        (`nn.transformer.DoubleStreamBlock` / `SingleStreamBlock`); 0 disables.
      token_focus_tokens: soft tokens xi per focused block (0 disables token focus).
      token_focus_layers: global block indices with token focus (empty = every block).
      token_focus_relaxation, token_focus_temperature, token_focus_gate_init: see `TokenFocus`.
      text_cross_attention: after each double-stream block, the image tokens (target and reference) also read the
        text through `nn.transformer.TextCrossAttention` (own softmax over [null; text], values carrying the pooled
        text). Not in Flux; see `MaskedGenerativeTransformer.text_cross_attention`.
      text_cross_source: the text cross-attention reads the text from the *reference* tokens (its update and gate at
        a target token are those of the reference token at the same grid position; the reference must have the
        target's size), and the text and reference streams of joint attention do not attend to target tokens
        (`nn.attention.condition_blind_to_target_bias`). Which tokens an instruction is about is then a function of
        the source image, the text and the time (reference tokens share the target's modulation, as in Kontext),
        not of the noisy target. Needs `text_cross_attention` and a reference. Not in Flux; see
        `MaskedGenerativeTransformer.text_cross_source` (docs/RESULTS.md, EditMGT: "Finding the named object").
      text_velocity: add to every target token's velocity `gate * mlp([pooled; temb])` (gate: the last text
        cross-attention gate at the token), a path from the instruction to the output that skips the trunk; the MLP's
        last layer starts at zero, so a fresh path changes nothing. With v = noise - x0, the text can set the edited
        region's mean velocity (its new color) directly. Needs `text_cross_attention`. Not in Flux; the flow
        analogue of `MaskedGenerativeTransformer.text_code_score`.
      dtype: activation/computation dtype; param_dtype: stored weight dtype.
    """

    num_layers: int = 2
    num_single_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    out_channels: int | None = None
    guidance_embeds: bool = False
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    zero_init_modulation: bool = True
    zero_init_output: bool = True
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    token_focus_tokens: int = 0
    token_focus_layers: tuple[int, ...] = ()
    token_focus_relaxation: str = "straight_through"
    token_focus_temperature: float = 1.0
    token_focus_gate_init: float = 0.0
    text_cross_attention: bool = False
    text_cross_source: bool = False
    text_velocity: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def focus_layers(self) -> tuple[int, ...]:
        """Global block indices that get token focus (empty when token focus is off)."""
        if self.token_focus_tokens <= 0:
            return ()
        layers = tuple(self.token_focus_layers) or tuple(range(self.num_blocks))
        bad = [layer for layer in layers if not 0 <= layer < self.num_blocks]
        if bad:
            raise ValueError(f"token_focus_layers {bad} are outside [0, {self.num_blocks})")
        return layers

    def block_name(self, layer: int) -> str:
        """Scope name of global block `layer` (double blocks first, then single), e.g. for captured attention."""
        return block_scope_name(layer, self.num_layers)

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        encoder_hidden: jax.Array,
        pooled: jax.Array,
        timestep: jax.Array,
        img_ids: PositionIds,
        txt_ids: PositionIds,
        guidance: jax.Array | None = None,
        *,
        ref_hidden: jax.Array | None = None,
        ref_ids: PositionIds | None = None,
        capture_layers: tuple[int, ...] = (),
        txt_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the velocity of the target tokens.

        Position ids given as NumPy arrays (e.g. from `latent_image_ids`, closed over rather than passed through
        `jit`) give RoPE tables bit-equal to diffusers; JAX arrays are evaluated in float32 (see `rope_frequencies`).

        Args:
          hidden: packed noisy target latents `[B, L, C_in]` (`pack_latents`).
          encoder_hidden: text encoder states `[B, Lt, D_text]` (Flux: T5).
          pooled: pooled text embedding `[B, D_pooled]` (Flux: CLIP).
          timestep: `[B]` flow time t in [0, 1] (1 = noise).
          img_ids: `[L, 3]` position ids of the target tokens (`latent_image_ids(h, w)`), or `[B, L, 3]`.
          txt_ids: `[Lt, 3]` position ids of the text tokens (Flux: zeros), same rank as `img_ids`.
          guidance: `[B]` guidance scale (e.g. 3.5), required iff `guidance_embeds`.
          ref_hidden: optional packed reference-image latents `[B, Lr, C_in]` (Kontext), clean (not noised).
          ref_ids: `[Lr, 3]` position ids of the reference tokens (`latent_image_ids(hr, wr, index=1)`).
          capture_layers: global block indices (double blocks first) whose attention probabilities over
            [text; target; reference] are sown into 'intermediates' (`<block_name>/attn/attention_probs`).
          txt_mask: `[B, Lt]` bool, the real text tokens; only token focus and text cross-attention use it (Flux
            attends without a mask).

        Returns:
          Velocity `[B, L, C_out]` for the target tokens (in `dtype`).
        """
        if (ref_hidden is None) != (ref_ids is None):
            raise ValueError("ref_hidden and ref_ids must be given together")
        if guidance is not None and not self.guidance_embeds:
            raise ValueError("guidance was passed but this model was built with guidance_embeds=False")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        if self.text_velocity and not (self.text_cross_attention and self.num_layers > 0):
            raise ValueError("text_velocity needs text_cross_attention (and at least one double-stream block)")
        if self.text_cross_source and not self.text_cross_attention:
            raise ValueError("text_cross_source needs text_cross_attention")
        if self.text_cross_source and (ref_hidden is None or ref_hidden.shape[1] != hidden.shape[1]):
            raise ValueError("text_cross_source needs reference tokens of the target's size")
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.width
        target_len = hidden.shape[1]
        ids = [txt_ids, img_ids]
        if ref_hidden is not None:
            hidden = jnp.concatenate([hidden, ref_hidden.astype(hidden.dtype)], axis=1)  # [B, L + Lr, C_in]
            ids.append(ref_ids)
        rope = rope_frequencies(_concat_ids(ids), self.axes_dims_rope, self.rope_theta)  # [Lt + L (+ Lr), Dh] each

        x = Dense(width, (None, "embed"), name="x_embedder", **kwargs)(hidden)  # [B, L (+ Lr), D]
        context = Dense(width, (None, "embed"), name="context_embedder", **kwargs)(encoder_hidden)  # [B, Lt, D]
        if guidance is not None:
            guidance = guidance.astype(jnp.float32) * 1000.0  # [B]
        temb = CombinedTimestepTextProjEmbeddings(width, self.guidance_embeds, name="time_text_embed", **kwargs)(
            timestep.astype(jnp.float32) * 1000.0, pooled, guidance
        )  # [B, D]

        block_kwargs = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_ratio=self.mlp_ratio,
            zero_init_modulation=self.zero_init_modulation,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_targets=self.lora_targets,
            **kwargs,
        )
        bias = None  # [1, 1, Lt + L + Lr, Lt + L + Lr]
        if self.text_cross_source:
            text_len = encoder_hidden.shape[1]
            bias = jnp.asarray(condition_blind_to_target_bias(text_len, target_len, target_len))[None, None]
        focus_layers = self.focus_layers
        gate = None  # [B, L (+ Lr)]: the last text cross-attention gate
        for layer in range(self.num_blocks):
            if layer in focus_layers:
                context = TokenFocus(
                    self.token_focus_tokens,
                    self.token_focus_relaxation,
                    self.token_focus_temperature,
                    self.token_focus_gate_init,
                    name=focus_module_name(layer),
                    **kwargs,
                )(context, txt_mask)  # [B, Lt, D]
            block_cls = DoubleStreamBlock if layer < self.num_layers else SingleStreamBlock
            block = block_cls(name=self.block_name(layer), **block_kwargs)
            x, context, _ = block(x, context, temb, rope, attention_bias=bias,
                                  capture_attention=layer in capture_layers)  # fmt: skip
            if self.text_cross_attention and layer < self.num_layers:
                mask = jnp.ones(context.shape[:2], bool) if txt_mask is None else txt_mask
                cross = TextCrossAttention(self.num_heads, self.head_dim, name=f"text_cross_blocks_{layer}", **kwargs)
                if self.text_cross_source:
                    update, gate = cross(x[:, target_len:], context, mask, pooled)  # [B, Lr, D], [B, Lr]
                    update, gate = (jnp.concatenate([value, value], axis=1) for value in (update, gate))
                else:
                    update, gate = cross(x, context, mask, pooled)
                x = x + update  # [B, L (+ Lr), D]

        x = x[:, :target_len]  # [B, L, D]: reference outputs are dropped
        scale, shift = AdaLNModulation(2, self.zero_init_modulation, name="norm_out", **kwargs)(temb)  # [B, D] each
        x = modulate(x, shift, scale, self.dtype)  # [B, L, D]
        out_channels = self.out_channels or hidden.shape[-1]
        output_init = nn.initializers.zeros_init() if self.zero_init_output else nn.initializers.lecun_normal()
        velocity = Dense(out_channels, ("embed", None), kernel_init=output_init, name="proj_out", **kwargs)(x)
        if self.text_velocity:
            text_time = jnp.concatenate([pooled.astype(temb.dtype), temb], axis=-1)  # [B, D_pooled + D]
            hidden_text = nn.gelu(Dense(width, (None, "embed"), name="text_velocity_in", **kwargs)(text_time))
            text_term = Dense(out_channels, ("embed", None), kernel_init=nn.initializers.zeros_init(),
                              name="text_velocity_out", **kwargs)(hidden_text)  # [B, C]  # fmt: skip
            velocity = velocity + gate[:, :target_len, None].astype(velocity.dtype) * text_term[:, None, :]
        return velocity  # [B, L, C]


def captured_attention(model: FlowDiT, intermediates: Mapping[str, Any], layers: Sequence[int]) -> jax.Array:
    """Stacks the attention probabilities sown for `layers` (see `capture_layers`): `[N, B, H, L_all, L_all]`."""
    return stack_captured_attention(intermediates, layers, model.num_layers)


# --- LoRA parameter utilities (work on unboxed param trees of any model built from `nn.transformer.Dense`). ---


def _last_key(path: tuple[Any, ...]) -> str | None:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return None


def lora_param_mask(params: Params) -> Any:
    """A tree like `params` with True on the adapter leaves (`lora_a`/`lora_b`), e.g. for `optax.masked`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_key(path) in LORA_LEAVES, params)


def _map_lora_nodes(params: Params, fn) -> dict[str, Any]:
    """Rebuilds `params` as plain dicts, applying `fn(node) -> node` to every dict that holds a `lora_a`."""
    if not isinstance(params, Mapping):
        return params
    node = {key: _map_lora_nodes(value, fn) for key, value in params.items()}
    if "lora_a" in node:
        missing = [key for key in ("kernel", "lora_b") if key not in node]
        if missing:
            raise ValueError(f"a LoRA layer lacks {missing}; keys are {sorted(node)}")
        node = fn(node)
    return node


def merge_lora(params: Params, lora_alpha: float, lora_rank: int) -> dict[str, Any]:
    """Folds every adapter into its kernel (`kernel += (alpha / rank) * lora_a @ lora_b`) and drops the adapters.

    The result is the param tree of the same model with `lora_rank=0` (e.g. `model.clone(lora_rank=0)`): one matmul
    per layer cheaper, and the form to export. The update is computed in float32 and cast to the kernel's dtype.
    Pure and jittable.
    """
    if lora_rank <= 0:
        raise ValueError(f"lora_rank must be positive, got {lora_rank}")
    scale = lora_alpha / lora_rank

    def merge(node):
        kernel = jnp.asarray(node["kernel"])
        delta = jnp.dot(jnp.asarray(node["lora_a"], jnp.float32), jnp.asarray(node["lora_b"], jnp.float32))
        merged = {key: value for key, value in node.items() if key not in LORA_LEAVES}
        merged["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)  # [in, out]
        return merged

    return _map_lora_nodes(params, merge)


def zero_lora(params: Params) -> dict[str, Any]:
    """The same tree with every `lora_b` zeroed: the LoRA model then computes exactly the base model.

    Use it for the frozen reference policy (GRPO's KL term) with the LoRA-enabled module and no second module.
    """
    return _map_lora_nodes(params, lambda node: {**node, "lora_b": jnp.zeros_like(node["lora_b"])})


def strip_lora(params: Params) -> dict[str, Any]:
    """The base weights alone (adapters dropped, not merged), for the same model with `lora_rank=0`."""
    return _map_lora_nodes(params, lambda node: {k: v for k, v in node.items() if k not in LORA_LEAVES})
