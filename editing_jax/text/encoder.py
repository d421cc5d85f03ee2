"""A small trainable text encoder: ids -> (hidden states, pooled embedding).

The MGT and the flow DiT only see `(hidden [B, L, D], pooled [B, P])`; a CLIP/Gemma port can replace this module
behind the same call signature.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from editing_jax.nn.transformer import Dense

Dtype = Any


class TextEncoder(nn.Module):
    """Pre-LayerNorm transformer encoder with learned positions and masked mean pooling.

    Attributes:
      vocab_size: number of token ids (the tokenizer's `vocab_size`).
      width: hidden width D.
      num_layers: transformer layers.
      num_heads: attention heads.
      max_length: maximum sequence length L.
      pooled_dim: width of the pooled embedding.
      word_skip: add each word's own layer-normalized embedding to its output state, so a word's identity reaches
        the readers whatever the blocks do. Without it EditMGT training nearly erased the new color: the states of
        "make the red circle X" at X differed by 4.6 % between colors after 5,000 steps, against 61 % at
        initialization (`benchmarks/text_color_probe.py`; docs/RESULTS.md, EditMGT: "Pixel head, longer training,
        and a text encoder that forgets the new color").
    """

    vocab_size: int
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 24
    pooled_dim: int = 64
    word_skip: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids: `[B, L]` int32, mask: `[B, L]` bool -> (hidden `[B, L, D]`, pooled `[B, P]`)."""
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"text length {length} exceeds max_length {self.max_length}")
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="token_embedding",
                     **kwargs)(ids)  # [B, L, D]  # fmt: skip
        words = x
        positions = self.param("position_embedding", nn.initializers.normal(0.02), (self.max_length, self.width),
                               self.param_dtype)  # fmt: skip
        x = x + positions[None, :length].astype(self.dtype)
        attention_mask = nn.make_attention_mask(jnp.ones_like(mask), mask)  # [B, 1, L, L]: attend to real words
        for i in range(self.num_layers):
            y = nn.LayerNorm(name=f"layers_{i}_norm1", **kwargs)(x)
            y = nn.MultiHeadDotProductAttention(self.num_heads, name=f"layers_{i}_attn", **kwargs)(
                y, y, mask=attention_mask
            )
            x = x + y
            y = nn.LayerNorm(name=f"layers_{i}_norm2", **kwargs)(x)
            y = Dense(4 * self.width, name=f"layers_{i}_fc1", **kwargs)(y)
            x = x + Dense(self.width, name=f"layers_{i}_fc2", **kwargs)(nn.gelu(y))
        x = nn.LayerNorm(name="final_norm", **kwargs)(x)  # [B, L, D]
        if self.word_skip:
            x = x + nn.LayerNorm(name="word_norm", **kwargs)(words)
        weights = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
        mean = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # [B, D]; 0 if empty
        pooled = Dense(self.pooled_dim, name="pooled_proj", **kwargs)(mean)  # [B, P]
        return x, pooled


class CaptionChangeHead(nn.Module):
    """Predicts how an edit changes the image's caption, word by word, from the pooled instruction embedding.

    Its loss (`caption_change_loss`) is an auxiliary training signal for the text encoder, not in EditMGT or
    CogniEdit: target minus source caption word counts (e.g. "make the red circle blue": red -1, blue +1). A text
    encoder trained only through an editor learns to find the named object (the referent's color) and lets the new
    attribute fade: in "make the red circle blue" the two color words differ only by their role, which lives in
    low-variance contextual features (docs/RESULTS.md, EditMGT: "The instruction's new color"). Pretrained
    encoders (CLIP, T5, Gemma) bring that role information; this loss asks our small encoder for it directly.

    Attributes:
      vocab_size: the word tokenizer's `vocab_size`.
    """

    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        """pooled `[B, P]` -> predicted word-count change `[B, vocab_size]`."""
        # Zero-initialized: the first loss is the size of the change, not of a random prediction over every word.
        return Dense(self.vocab_size, kernel_init=nn.initializers.zeros, name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(pooled)  # fmt: skip


def caption_change_loss(predicted: jax.Array, change: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Squared error of a predicted caption change, summed over words and averaged over the weighted rows.

    Args:
      predicted: `[B, V]` predicted word-count change.
      change: `[B, V]` target minus source caption word counts (`WordTokenizer.bag_of_words`).
      rows: `[B]` row weights (0 for rows whose instruction was dropped for classifier-free guidance).

    Returns:
      `(loss, recall)`: the loss and the share of changed words (change != 0, weighted rows) whose rounded
      prediction equals the change.
    """
    predicted = predicted.astype(jnp.float32)
    rows = rows.astype(jnp.float32)
    squared = jnp.sum(jnp.square(predicted - change), axis=-1)  # [B]
    loss = jnp.sum(squared * rows) / jnp.maximum(jnp.sum(rows), 1.0)
    changed = (change != 0).astype(jnp.float32) * rows[:, None]  # [B, V]
    hit = (jnp.round(predicted) == change).astype(jnp.float32)
    recall = jnp.sum(hit * changed) / jnp.maximum(jnp.sum(changed), 1.0)
    return loss, recall
