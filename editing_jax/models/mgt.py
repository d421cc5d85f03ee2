"""Masked generative transformer (Meissonic / EditMGT) over VQ token grids.

Forward pass (names follow Meissonic's `Transformer2DModel` so released weights map by name):
  tokens [B, h, w] --embed (embedding -> RMSNorm -> 1x1)--> [B, h, w, D] --down_block (optional 2x)--> grid g
  --project_to_hidden_norm/project_to_hidden--> image tokens C_I [B, g*g, D];
  the source image's tokens go through the same layers to give condition tokens C_V (EditMGT);
  text hidden states --context_embedder -> encoder_proj_layer_norm--> C_T [B, Lt, D];
  pooled text ++ sinusoidal micro-conditions --cond_embed--> pooled projection;
  temb = time_text_embed(timestep * 1000, pooled projection); C_V's modulation uses timestep 0;
  double-stream blocks over [C_T; C_I; C_V], then single-stream blocks, then project_from_hidden_norm/
  project_from_hidden -> up_block -> mlm_layer -> logits [B, h, w, codebook_size] (the mask token is never predicted).

EditMGT's attention bias E over [C_T; C_I; C_V] has log(gamma) on the C_I<->C_V blocks (paper eq. 2). We also put
log(gamma) on text queries -> C_V keys: with the paper's E alone, gamma = 0 still lets the condition leak into the
image through the text stream (C_V -> C_T in layer k, C_T -> C_I in layer k + 1). With it, gamma = 1 is plain joint
attention, gamma = 0 removes the condition exactly (logits get -1e9, whose exp underflows to 0) and gamma > 1
strengthens it. Padded text positions are masked out as keys.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.nn import uvit
from editing_jax.nn.attention import (
    NEG_INF_BIAS,
    condition_blind_to_target_bias,
    grid_position_ids,
    rope_frequencies,
)
from editing_jax.nn.embeddings import CombinedTimestepTextProjEmbeddings, TimestepEmbedding, timestep_embedding
from editing_jax.nn.transformer import (
    Dense,
    DoubleStreamBlock,
    SingleStreamBlock,
    TextCrossAttention,
    block_scope_name,
    grid_position_features,
    matmul_last,
    stack_captured_attention,
)

Dtype = Any
# The pixel head's initial logit scale (1 per unit of squared pixel distance; 10 made early training unstable,
# docs/RESULTS.md) and gate offset (a fresh head mostly keeps the source pixel: sigmoid(-2) = 0.12).
PIXEL_LOG_SCALE_INIT = 0.0
PIXEL_GATE_OFFSET = -2.0


def gamma_bias(gamma: float | jax.Array, text_len: int, image_len: int, cond_len: int) -> jax.Array:
    """EditMGT's bias E `[L, L]` over [text; image; cond] (rows = queries): log(gamma) on image<->cond and
    text -> cond blocks, 0 elsewhere (see the module docstring)."""
    gamma = jnp.asarray(gamma, jnp.float32)
    log_gamma = jnp.where(gamma > 0, jnp.log(jnp.maximum(gamma, 1e-30)), NEG_INF_BIAS)
    groups = np.concatenate([np.zeros(text_len, np.int32), np.ones(image_len, np.int32), np.full(cond_len, 2)])
    query, key = groups[:, None], groups[None, :]
    cross = ((query == 1) & (key == 2)) | ((query == 2) & (key == 1)) | ((query == 0) & (key == 2))
    return jnp.where(jnp.asarray(cross), log_gamma, 0.0)  # [L, L]


class MaskedGenerativeTransformer(nn.Module):
    """Meissonic-style MGT with EditMGT's condition tokens.

    Attributes:
      codebook_size: VQ codebook size V; the mask token id is V (vocabulary V + 1).
      num_layers: double-stream blocks.
      num_single_layers: single-stream blocks.
      num_heads, head_dim: attention shape; width D = num_heads * head_dim.
      embed_dim: width of the token embedding table and the MLM head's hidden layer.
      downsample: halve the token grid inside the transformer (and upsample before the MLM head).
      micro_cond_dim: sinusoid width per micro-condition (Meissonic: 256 for 5 conditions).
      num_micro_conds: number of micro-conditions (original size, crop, aesthetic score in Meissonic).
      axes_dims_rope: RoPE channels per position axis (sum = head_dim).
      qk_norm_scale_init: initial query/key RMSNorm scale of the blocks (1 = diffusers).
      source_concat: also add a (zero-initialized) projection of the condition tokens' embedding to the target
        tokens' embedding at the same grid position, InstructPix2Pix-style, besides EditMGT's C_V attention path.
        Not in EditMGT: a from-scratch model learns to copy unchanged regions far sooner. The path is scaled by
        min(gamma, 1), so gamma = 0 still removes the condition exactly.
      source_skip: also add a (zero-initialized) projection of the condition tokens' embedding right before the MLM
        head, at full token resolution (after the 2x upsampling), scaled like `source_concat`. Not in EditMGT: with
        `downsample` every token must otherwise be rebuilt from a 2x2-merged representation, which caps how exactly
        a from-scratch model copies unchanged tokens (89 % after 1,200 quickstart steps, docs/RESULTS.md).
      source_copy: add a learned per-position copy score to the logit of the condition token at the same grid
        position (a pointer/copy mechanism, scaled like `source_concat`). Not in EditMGT: editing keeps most tokens,
        and a scalar "keep this token" decision is far easier to learn from scratch than re-encoding a token's
        identity through the trunk and the MLM head.
      code_content_dim: F > 0 gives the model what each code *looks like*: `__call__` then takes the frozen VQ
        codebook `code_features [V, F]` (e.g. the 2x2 pixel blocks of the patch VQ), standardized per feature; a
        Dense of a token's code vector is added to its embedding, and the logits get a content term
        <q(hidden), k(code vector)> with an MLP key over the codebook. Not in Meissonic/EditMGT, whose code ids are
        opaque: with opaque ids a from-scratch model must learn "this code recolored" as a lookup per code and
        color; with content it can predict the look of the new block and let the head find the matching code.
      fused_code_head: with code content, the MLM head and the content term share one 1,024-way product: the logits
        are `u @ (W + K^T / sqrt(E))` with `u` the MLM layer's normalized features, `W` its output kernel and `K` the
        content keys, instead of `u @ W + <content_query(hidden), K> / sqrt(E)`. Not in EditMGT: the two `[E, V]`
        products at every token were 46 % of a training step's FLOPs; the fused head drops one and the
        `content_query` projection. Measured on the quick config: 12 % less time per step, 1.7 points below the
        two heads at equal steps (docs/RESULTS.md, EditMGT: "One code head").
      content_head: with code content, also regress each position's target code vector (standardized, `[B, h, w,
        F]`) from the final hidden state and sow it as 'content_prediction' (trained by `loss.content_weight`; not
        used by the logits). Not in EditMGT: a squared error on the block's look gives partial credit for the right
        new color with the wrong shape code, which the cross-entropy over code ids does not.
      text_cross_attention: after each double-stream block, image tokens also read the text through
        `TextCrossAttention` (a softmax over [null; text] of their own, values carrying the pooled instruction). Not in
        Meissonic/EditMGT: with joint attention alone a from-scratch model leaves a named object's tokens copied
        (docs/RESULTS.md, EditMGT: "The hidden state never learns the new look").
      text_gate_copy: scale the source paths that act at the output (`source_skip`, `source_copy`) per token by 1 - the
        last text cross-attention block's gate, so a token the instruction is about is not copied from the source.
        Not in EditMGT: with the gate supervised (`loss.text_gate_weight`) the model knows where the edit is (AUROC
        0.95 on recolored tokens) and still copies most of those tokens (docs/RESULTS.md).
      pixel_channels: C > 0 adds the pixel head (needs code content whose vectors are pixel blocks, `F = C * N`
        channel-major, as the patch VQ's): from the final hidden state and the source code's N pixels, a per-pixel
        MLP predicts each pixel of the block as a gated change of the source pixel, `p = g * c + (1 - g) * s`, and
        every code k gets the logit `-scale * ||pixels_k - p||^2` (scale learned). Not in EditMGT: drawing a block in a
        new color means choosing among 1,024 opaque codes, one lookup per (block shape, color pair) to learn; per
        pixel it is one rule, "this source pixel belongs to the named object: give it the new color" (docs/RESULTS.md,
        EditMGT: "What the model cannot draw").
      text_code_score: add to every code's logit a text score, `gate * <text_query(pooled_text), k(code vector)>`
        (the content keys; `gate` the last text cross-attention block's gate at the token), so the instruction can
        name the new look straight at the head: the hidden state's logits say which block shape, the text's which
        color, and their sum picks the code. Needs `text_cross_attention` and code content; the query starts at
        zero. Not in EditMGT: at the tokens of a recolored object the text cross-attention's update carries the new
        color weakly (a ridge probe reads it from 5 % of its variance) and the trunk loses it before the head.
        Measured on the quick config: background edits 10 -> 17 of 22, object colors still 0 (docs/RESULTS.md,
        EditMGT: "The instruction's new color").
      text_code_token_gate: the text score is also scaled per token by `sigmoid(token_gate(final hidden state))`, a
        gate at full token resolution (the cross-attention gate lives on the 2x-downsampled grid, so one gate cell
        covers an object and the background around it). Its logit is sown as 'text_token_gate_logit' and supervised
        with the changed tokens by `loss.text_gate_weight`. Needs `text_code_score`. Not in EditMGT. Measured on the
        quick config with `loss.changed_row_balance`: it does not keep background edits off the objects
        (docs/RESULTS.md, EditMGT: "Giving object edits their weight in the full mix").
      token_change_head: a per-token logit of "this token changes" read from the final hidden state at full token
        resolution, sown as 'token_change_logit' and trained against the changed tokens by `loss.token_change_weight`.
        Region hold can read it (`sampling.attention_source='token_change'`): the cross-attention gate lives on the
        2x-downsampled grid, where every cell of a background edit holds an edited pixel. Not in EditMGT.
      text_cross_single: text cross-attention also follows every single-stream block (default: the double-stream
        blocks only). Not in EditMGT: finding "the red circle" among a red square and a blue circle needs each token
        to know its object's color *and* kind, which one block of joint attention before the only gate of the
        quick model (one double-stream block) may not compute; a later gate reads tokens after every block.
      text_cross_source: the text cross-attention reads the text from the *condition* tokens at the same grid
        position (interpolated towards the target tokens as gamma goes below 1, so gamma = 0 still removes the
        source), and its update goes to both streams. Which tokens an instruction is about is a property of the
        source image and the text; read from partly masked target tokens, the supervised gate learns "this visible
        target token differs from the source" during training, which the one-step editor (every target token masked)
        never has. Not in EditMGT.
      gate_text_dim: Dg > 0 gives the text cross-attention its own text: the last Dg features of `text_hidden` are
        the states of a second text encoder (`EditMGT.gate_text_encoder`, frozen at init), projected by their own
        `gate_context_embedder`; the joint attention reads the first features. Not in EditMGT: the source-read gate
        finds the named object only with a text encoder that keeps its words apart, frozen (trained, it merges the
        color words), and the whole-image edits want a trained one (docs/RESULTS.md, EditMGT: "Finding the named
        object").
      text_cross_positions: the text cross-attention's queries also get the tokens' grid positions (words like "top
        left" can then be matched by place; see `TextCrossAttention`).
      absolute_positions: image tokens (target and condition alike) get a learned projection of their grid position's
        sinusoidal features, zero at init, in the hidden stream. Not in EditMGT: RoPE is relative, so a token has no
        place of its own to match "in the top left" against or to know where inside a cell it sits, which adding or
        moving an object needs. Measured on the quick config: within noise, adds still 0 (docs/RESULTS.md, EditMGT:
        "Learning rate, token positions").
      rope_theta: RoPE base (Meissonic: 10000; small token grids discriminate neighbours better with a smaller base).
      mlp_ratio: MLP width / D.
      zero_init_modulation: adaLN-Zero initialization of the blocks.
    """

    codebook_size: int
    num_layers: int = 2
    num_single_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    embed_dim: int = 64
    downsample: bool = False
    micro_cond_dim: int = 16
    num_micro_conds: int = 5
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    rope_theta: float = 10000.0
    qk_norm_scale_init: float = 1.0
    source_concat: bool = False
    source_skip: bool = False
    source_copy: bool = False
    code_content_dim: int = 0
    fused_code_head: bool = False
    content_head: bool = False
    text_cross_attention: bool = False
    text_cross_single: bool = False
    text_cross_source: bool = False
    gate_text_dim: int = 0
    text_cross_positions: bool = False
    absolute_positions: bool = False
    text_gate_copy: bool = False
    text_code_score: bool = False
    text_code_token_gate: bool = False
    token_change_head: bool = False
    pixel_channels: int = 0
    mlp_ratio: float = 4.0
    zero_init_modulation: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def setup(self):
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.width
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        self.embed = uvit.ConvEmbed(self.codebook_size + 1, self.embed_dim, width, **kwargs)
        if self.downsample:
            self.down_block = uvit.Downsample(**kwargs)
            self.up_block = uvit.Upsample(**kwargs)
        self.project_to_hidden_norm = uvit.rms_norm(**kwargs)
        self.project_to_hidden = Dense(width, (None, "embed"), use_bias=False, **kwargs)
        self.project_from_hidden_norm = uvit.rms_norm(**kwargs)
        self.project_from_hidden = Dense(width, (None, "embed"), use_bias=False, **kwargs)
        self.context_embedder = Dense(width, (None, "embed"), **kwargs)
        self.encoder_proj_layer_norm = uvit.rms_norm(**kwargs)
        self.cond_embed = TimestepEmbedding(width, use_bias=False, **kwargs)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(width, **kwargs)
        block_kwargs = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_ratio=self.mlp_ratio,
            qk_norm_scale_init=self.qk_norm_scale_init,
            zero_init_modulation=self.zero_init_modulation,
            **kwargs,
        )
        self.transformer_blocks = [DoubleStreamBlock(**block_kwargs) for _ in range(self.num_layers)]
        if (self.text_cross_positions or self.text_gate_copy) and not self.text_cross_attention:
            raise ValueError("text_cross_positions and text_gate_copy need text_cross_attention")
        if self.text_code_score and not (self.text_cross_attention and self.code_content_dim):
            raise ValueError("text_code_score needs text_cross_attention and code content (code_content_dim > 0)")
        if self.text_code_token_gate and not self.text_code_score:
            raise ValueError("text_code_token_gate needs text_code_score")
        if self.text_cross_attention and self.num_layers < 1:
            raise ValueError("text_cross_attention follows the double-stream blocks: it needs num_layers >= 1")
        if (self.text_cross_single or self.text_cross_source) and not self.text_cross_attention:
            raise ValueError("text_cross_single and text_cross_source need text_cross_attention")
        if self.gate_text_dim:
            if not self.text_cross_attention:
                raise ValueError("gate_text_dim > 0 needs text_cross_attention")
            self.gate_context_embedder = Dense(width, (None, "embed"), **kwargs)
            self.gate_context_norm = uvit.rms_norm(**kwargs)
        if self.text_cross_attention:
            self.text_cross_blocks = [TextCrossAttention(self.num_heads, self.head_dim, **kwargs)
                                      for _ in range(self.num_text_cross_blocks)]  # fmt: skip
        self.single_transformer_blocks = [SingleStreamBlock(**block_kwargs) for _ in range(self.num_single_layers)]
        self.mlm_layer = uvit.ConvMlmLayer(self.embed_dim, self.codebook_size, **kwargs)
        if self.source_concat:
            self.source_proj = Dense(width, (None, "embed"), use_bias=False, kernel_init=nn.initializers.zeros_init(),
                                     **kwargs)  # fmt: skip
        if self.source_copy:
            self.copy_head = Dense(1, ("embed", None), **kwargs)
        if self.code_content_dim:
            self.content_embed = Dense(width, (None, "embed"), use_bias=False, **kwargs)
            self.content_key_in = Dense(self.embed_dim, (None, None), **kwargs)
            self.content_key_out = Dense(self.embed_dim, (None, None), **kwargs)
            if not self.fused_code_head:
                self.content_query = Dense(self.embed_dim, ("embed", None), use_bias=False, **kwargs)
        elif self.fused_code_head:
            raise ValueError("fused_code_head needs code content (code_content_dim > 0)")
        if self.text_code_score:
            self.text_code_query = Dense(self.embed_dim, (None, None), use_bias=False,
                                         kernel_init=nn.initializers.zeros_init(), **kwargs)  # fmt: skip
        if self.text_code_token_gate:
            self.text_token_gate = Dense(1, ("embed", None), **kwargs)
        if self.token_change_head:
            self.token_change = Dense(1, ("embed", None), **kwargs)
        if self.content_head:
            if not self.code_content_dim:
                raise ValueError("content_head needs code_content_dim > 0")
            self.content_regressor = Dense(self.code_content_dim, ("embed", None), **kwargs)
        if self.pixel_channels:
            if not self.code_content_dim or self.code_content_dim % self.pixel_channels:
                raise ValueError(f"pixel_channels={self.pixel_channels} needs code content whose vector size "
                                 f"(code_content_dim={self.code_content_dim}) is a multiple of it")  # fmt: skip
            pixels = self.code_content_dim // self.pixel_channels
            self.pixel_from_hidden = Dense(self.embed_dim, ("embed", None), **kwargs)
            self.pixel_from_source = Dense(self.embed_dim, (None, None), use_bias=False, **kwargs)
            self.pixel_position = self.param("pixel_position", nn.initializers.normal(0.02), (pixels, self.embed_dim),
                                             self.param_dtype)  # fmt: skip
            self.pixel_out = Dense(self.pixel_channels + 1, (None, None), **kwargs)  # color, gate logit
            self.pixel_log_scale = self.param("pixel_log_scale", nn.initializers.constant(PIXEL_LOG_SCALE_INIT), (),
                                              jnp.float32)  # fmt: skip
        if self.absolute_positions:
            self.position_embed = Dense(width, (None, "embed"), use_bias=False, kernel_init=nn.initializers.zeros_init(),
                                        **kwargs)  # fmt: skip
        if self.source_skip:
            self.source_skip_proj = Dense(width, (None, "embed"), use_bias=False,
                                          kernel_init=nn.initializers.zeros_init(), **kwargs)  # fmt: skip

    def _standardized_codes(self, code_features: jax.Array | None) -> jax.Array | None:
        """`[V, F]` codebook standardized per feature (frozen), or None when code content is off."""
        if not self.code_content_dim:
            return None
        if code_features is None or code_features.shape != (self.codebook_size, self.code_content_dim):
            shape = None if code_features is None else tuple(code_features.shape)
            raise ValueError(f"code_content_dim={self.code_content_dim} needs code_features of shape "
                             f"{(self.codebook_size, self.code_content_dim)}, got {shape}")  # fmt: skip
        return standardize_code_features(code_features)

    def _pixel_logits(self, hidden: jax.Array, code_features: jax.Array, source: jax.Array | None,
                      strength: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        """The pixel head (see `pixel_channels`).

        Args:
          hidden: `[B, h, w, D]` final hidden state at token resolution.
          code_features: `[V, C * N]` raw (not standardized) codebook pixel blocks, channel-major.
          source: `[B, h, w]` source tokens, or None (no condition: the source pixels are 0).
          strength: scales the source pixels like the other source paths (min(gamma, 1); 0 removes them exactly).

        Returns:
          logits `[B, h, w, V]` and the predicted pixels `[B, h, w, N, C]`.
        """
        code_pixels = code_pixel_blocks(code_features, self.pixel_channels)  # [V, N, C]
        vocab = code_pixels.shape[0]
        if source is None:
            source_pixels = jnp.zeros((*hidden.shape[:3], *code_pixels.shape[1:]), jnp.float32)
        else:
            source_pixels = strength * code_pixels[source]  # [B, h, w, N, C]
        features = (self.pixel_from_hidden(hidden)[..., None, :] + self.pixel_from_source(source_pixels)
                    + self.pixel_position.astype(hidden.dtype))  # fmt: skip
        out = self.pixel_out(nn.gelu(features)).astype(jnp.float32)  # [B, h, w, N, C + 1]
        gate = jax.nn.sigmoid(out[..., -1:] + PIXEL_GATE_OFFSET)  # [B, h, w, N, 1]
        prediction = gate * out[..., :-1] + (1.0 - gate) * source_pixels  # [B, h, w, N, C]
        flat_codes = code_pixels.reshape(vocab, -1)  # [V, N*C]
        flat = prediction.reshape(*prediction.shape[:3], -1)  # [B, h, w, N*C]
        distance = (jnp.sum(flat**2, -1, keepdims=True) - 2.0 * matmul_last(flat, flat_codes.T)
                    + jnp.sum(flat_codes**2, -1))  # fmt: skip
        return -jnp.exp(self.pixel_log_scale) * distance, prediction

    def _embed_tokens(self, tokens: jax.Array, codes: jax.Array | None) -> jax.Array:
        """tokens `[B, h, w]` -> `[B, h, w, D]`: the id embedding plus, with code content, its code vector's."""
        x = self.embed(tokens)  # [B, h, w, D]
        if codes is not None:
            padded = jnp.concatenate([codes, jnp.zeros((1, codes.shape[1]), codes.dtype)])  # [V + 1, F]: mask = 0
            x = x + self.content_embed(padded[tokens]).astype(x.dtype)
        return x

    def _image_tokens(
        self, tokens: jax.Array, extra: jax.Array | None = None, codes: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[int, int]]:
        x = self._embed_tokens(tokens, codes)  # [B, h, w, D]
        if extra is not None:
            x = x + extra
        if self.downsample:
            x = self.down_block(x)  # [B, h/2, w/2, D]
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        return self.project_to_hidden(self.project_to_hidden_norm(x)), (height, width)  # [B, g*g, D]

    def __call__(
        self,
        tokens: jax.Array,
        text_hidden: jax.Array,
        text_mask: jax.Array,
        pooled_text: jax.Array,
        timestep: jax.Array,
        micro_conds: jax.Array,
        *,
        cond_tokens: jax.Array | None = None,
        gamma: float | jax.Array | None = None,
        capture_layers: tuple[int, ...] = (),
        code_features: jax.Array | None = None,
    ) -> jax.Array:
        """Logits over the codebook.

        Args:
          tokens: `[B, h, w]` int32 target tokens, `mask_token_id` where unknown.
          text_hidden: `[B, Lt, Dt]` text encoder states (`[B, Lt, Dt + Dg]` with `gate_text_dim` = Dg: the
            joint attention's text, then the text cross-attention's).
          text_mask: `[B, Lt]` bool, real text positions.
          pooled_text: `[B, P]` pooled text embedding.
          timestep: `[B]` masking rate in [0, 1] (scaled by 1000 inside, as Meissonic).
          micro_conds: `[B, num_micro_conds]` raw micro-condition values.
          cond_tokens: optional `[B, h, w]` source-image tokens (EditMGT's C_V).
          gamma: condition strength (None = 1, no bias term in the graph).
          capture_layers: global block indices (double blocks first, then single) whose attention probabilities
            are sown into 'intermediates' (`transformer_blocks_i/attn/attention_probs`, ...).
          code_features: `[V, F]` frozen codebook vectors, required iff `code_content_dim > 0`.

        Returns:
          `[B, h, w, codebook_size]` logits.
        """
        batch, height, width = tokens.shape
        codes = self._standardized_codes(code_features)  # [V, F] or None
        micro = timestep_embedding(micro_conds.reshape(-1), self.micro_cond_dim).reshape(batch, -1)  # [B, M*E]
        pooled = self.cond_embed(jnp.concatenate([pooled_text.astype(jnp.float32), micro], axis=-1))  # [B, D]
        temb = self.time_text_embed(timestep.astype(jnp.float32) * 1000.0, pooled)  # [B, D]
        gate_context = None  # [B, Lt, D]: the text cross-attention's own text
        if self.gate_text_dim:
            split = text_hidden.shape[-1] - self.gate_text_dim
            text_hidden, gate_text = text_hidden[..., :split], text_hidden[..., split:]
            gate_context = self.gate_context_norm(self.gate_context_embedder(gate_text))
        context = self.encoder_proj_layer_norm(self.context_embedder(text_hidden))  # [B, Lt, D]

        extra = skip = None
        strength = 1.0 if gamma is None else jnp.minimum(jnp.asarray(gamma, jnp.float32), 1.0)
        if cond_tokens is not None and (self.source_concat or self.source_skip):
            cond_embedding = self._embed_tokens(cond_tokens, codes)  # [B, h, w, D]
            if self.source_concat:
                extra = strength * self.source_proj(cond_embedding)
            if self.source_skip:
                skip = strength * self.source_skip_proj(cond_embedding)
        hidden, (grid_h, grid_w) = self._image_tokens(tokens, extra, codes)  # [B, g, D]
        image_ids = grid_position_ids(grid_h, grid_w)  # [g, 3]
        text_len, image_len = context.shape[1], hidden.shape[1]
        ids = [np.zeros((text_len, 3), np.float32), image_ids]
        cond_hidden = cond_temb = None
        cond_len = 0
        if cond_tokens is not None:
            cond_hidden, _ = self._image_tokens(cond_tokens, codes=codes)  # [B, g, D]
            cond_temb = self.time_text_embed(jnp.zeros((batch,), jnp.float32), pooled)  # [B, D]
            cond_len = cond_hidden.shape[1]
            ids.append(image_ids)
        if self.absolute_positions:
            position = self.position_embed(grid_position_features(image_ids)).astype(hidden.dtype)[None]  # [1, g, D]
            hidden = hidden + position
            if cond_hidden is not None:
                cond_hidden = cond_hidden + position
        rope = rope_frequencies(np.concatenate(ids), self.axes_dims_rope, self.rope_theta)  # [L, Dh] each

        total = text_len + image_len + cond_len
        key_mask = jnp.concatenate([text_mask, jnp.ones((batch, image_len + cond_len), bool)], axis=1)  # [B, L]
        bias = jnp.where(key_mask, 0.0, NEG_INF_BIAS)[:, None, None, :]  # [B, 1, 1, L]
        if gamma is not None and cond_len:
            bias = bias + gamma_bias(gamma, text_len, image_len, cond_len)[None, None]  # [B, 1, L, L]
        if self.text_cross_source and cond_len:
            bias = bias + condition_blind_to_target_bias(text_len, image_len, cond_len)[None, None]  # [B, 1, L, L]
        bias = jnp.broadcast_to(bias, (batch, 1, bias.shape[2], total))

        gate = None  # [B, g]: the last text cross-attention block's gate
        blocks = (*self.transformer_blocks, *self.single_transformer_blocks)  # global layer index = position
        for layer, block in enumerate(blocks):
            hidden, context, cond_hidden = block(
                hidden,
                context,
                temb,
                rope,
                cond_hidden=cond_hidden,
                cond_temb=cond_temb,
                attention_bias=bias,
                capture_attention=layer in capture_layers,
            )
            if self.text_cross_attention and layer < self.num_text_cross_blocks:
                positions = image_ids if self.text_cross_positions else None
                queries = hidden
                if self.text_cross_source and cond_hidden is not None:
                    # The source's tokens; as gamma goes to 0, the target's.
                    queries = hidden + strength * (cond_hidden - hidden)
                text = context if gate_context is None else gate_context
                update, gate = self.text_cross_blocks[layer](queries, text, text_mask, pooled, positions)
                hidden = hidden + update
                if self.text_cross_source and cond_hidden is not None:
                    cond_hidden = cond_hidden + update

        hidden = self.project_from_hidden(self.project_from_hidden_norm(hidden))  # [B, g, D]
        hidden = hidden.reshape(batch, grid_h, grid_w, -1)
        if self.downsample:
            hidden = self.up_block(hidden)  # [B, h, w, D]
        fine_gate = None  # [B, h, w, 1]: the last text cross-attention gate at full token resolution
        if gate is not None:
            fine_gate = gate.reshape(batch, grid_h, grid_w)
            if self.downsample:
                fine_gate = jnp.repeat(jnp.repeat(fine_gate, 2, axis=1), 2, axis=2)  # [B, h, w]
            fine_gate = fine_gate[..., None].astype(hidden.dtype)
        keep = None  # [B, h, w, 1]: 1 - gate, where the source paths may copy
        if self.text_gate_copy and cond_tokens is not None:
            keep = 1.0 - fine_gate
        if skip is not None:
            hidden = hidden + (skip if keep is None else keep * skip)
        keys = None if codes is None else self.content_key_out(nn.gelu(self.content_key_in(codes)))  # [V, E]
        if self.fused_code_head:
            logits = self.mlm_layer(hidden, kernel_offset=keys.T / np.sqrt(self.embed_dim))  # [B, h, w, V]
        else:
            logits = self.mlm_layer(hidden)  # [B, h, w, V]
        if self.token_change_head:
            self.sow("intermediates", "token_change_logit", self.token_change(hidden)[..., 0])  # [B, h, w]
        if codes is not None:
            if not self.fused_code_head:
                queries = self.content_query(hidden)  # [B, h, w, E]
                content = matmul_last(queries, keys.T.astype(queries.dtype)) / np.sqrt(self.embed_dim)  # [B, h, w, V]
                logits = logits + content.astype(logits.dtype)
            if self.text_code_score:
                text_query = self.text_code_query(pooled_text.astype(self.dtype))  # [B, E]
                score = jnp.einsum("be,ve->bv", text_query, keys.astype(text_query.dtype)) / np.sqrt(self.embed_dim)
                weight = fine_gate  # [B, h, w, 1]
                if self.text_code_token_gate:
                    token_gate = self.text_token_gate(hidden)  # [B, h, w, 1]: a logit
                    self.sow("intermediates", "text_token_gate_logit", token_gate[..., 0])
                    weight = weight * jax.nn.sigmoid(token_gate.astype(jnp.float32)).astype(weight.dtype)
                logits = logits + (weight * score[:, None, None, :]).astype(logits.dtype)  # [B, h, w, V]
        if self.pixel_channels:
            if code_features is None:
                raise ValueError("pixel_channels > 0 needs code_features")
            pixel_logits, prediction = self._pixel_logits(hidden, code_features, cond_tokens, strength)
            logits = logits + pixel_logits.astype(logits.dtype)
            self.sow("intermediates", "pixel_prediction", prediction)  # [B, h, w, N, C]
        if self.content_head:
            self.sow("intermediates", "content_prediction", self.content_regressor(hidden))  # [B, h, w, F]
        if self.source_copy and cond_tokens is not None:
            copy_score = self.copy_head(hidden).astype(logits.dtype)  # [B, h, w, 1]
            if keep is not None:
                copy_score = keep.astype(logits.dtype) * copy_score
            self.sow("intermediates", "copy_score", copy_score[..., 0])  # a no-op unless 'intermediates' is mutable
            is_source = jax.nn.one_hot(cond_tokens, self.codebook_size, dtype=logits.dtype)  # [B, h, w, V]
            logits = logits + strength * copy_score * is_source
        return logits

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def num_text_cross_blocks(self) -> int:
        """Text cross-attention block i follows transformer block i (0 without `text_cross_attention`)."""
        if not self.text_cross_attention:
            return 0
        return self.num_blocks if self.text_cross_single else self.num_layers

    def block_name(self, layer: int) -> str:
        return block_scope_name(layer, self.num_layers)


def standardize_code_features(code_features: jax.Array) -> jax.Array:
    """`[V, F]` frozen codebook vectors standardized per feature: what code content embeds and `content_head`
    predicts."""
    features = jax.lax.stop_gradient(code_features.astype(jnp.float32))
    return (features - features.mean(0)) / (features.std(0) + 1e-6)


def code_pixel_blocks(code_features: jax.Array, channels: int) -> jax.Array:
    """Channel-major code vectors `[V, C * N]` (the patch VQ's) -> frozen pixel blocks `[V, N, C]`."""
    codes = jax.lax.stop_gradient(code_features.astype(jnp.float32))
    return codes.reshape(codes.shape[0], channels, -1).transpose(0, 2, 1)


def captured_attention(model: MaskedGenerativeTransformer, intermediates: dict, layers: tuple[int, ...]) -> jax.Array:
    """Stacks the attention probabilities sown for `layers`: `[N, B, heads, L, L]`."""
    return stack_captured_attention(intermediates, layers, model.num_layers)
