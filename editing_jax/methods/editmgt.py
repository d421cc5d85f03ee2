"""EditMGT: masked-token training of the MGT on VQ tokens, and the one-jit editing sampler with region hold.

Stages (config `stage`):
  * 't2i': text-to-image pretraining; text = target caption, no condition tokens.
  * 'edit': edit fine-tuning on (source, instruction, target); the source tokens are EditMGT's condition C_V.

Training (paper eq. 1): tokens of the target image are masked at a rate r drawn from the truncated arccos density,
and the loss is the cross-entropy on masked positions only. The text is dropped (empty) with probability
`loss.cfg_dropout` so the model also learns the unconditional prediction used by classifier-free guidance.

The frozen VQ tokenizer rides along in the model state (`model_state['tokenizer']`), so an EditMGT checkpoint is
self-contained: `editing-jax edit/eval` need nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from editing_jax.methods.tokenizer import float_to_uint8, images_to_float
from editing_jax.models.mgt import (
    MaskedGenerativeTransformer,
    captured_attention,
    code_pixel_blocks,
    standardize_code_features,
)
from editing_jax.models.vq import VQModel
from editing_jax.nn.reductions import argmax_last
from editing_jax.sampling import attention_maps, maskgit
from editing_jax.text.encoder import CaptionChangeHead, TextEncoder, caption_change_loss
from editing_jax.text.tokenizer import WordTokenizer
from editing_jax.train.objective import Batch, LossAux, Objective

PyTree = Any
STAGES = ("t2i", "edit")
# Meissonic's micro-conditions: original (width, height), crop (top, left), aesthetic score.
AESTHETIC_SCORE = 6.0
MAX_VISUALIZED_ROWS = 8


ATTENTION_SOURCES = ("joint", "text_cross", "token_change")


def reject_unsupported(overrides: dict, names, editor: str, other: str) -> None:
    """ValueError naming the overrides (those not None) that `editor`'s settings lack: `other`'s settings."""
    unsupported = sorted(k for k, v in overrides.items() if v is not None and k not in names)
    if unsupported:
        raise ValueError(f"{editor} has no {', '.join(unsupported)} setting ({other} only)")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Inference settings of the editing sampler (static ones change the compiled graph)."""

    num_steps: int = 12
    guidance_scale: float = 0.0
    temperature: float = 2.0  # re-masking (confidence) noise, annealed to 0
    token_temperature: float = 1.0  # token draws; < 0 anneals them with `temperature` (our sampler before 2026-11)
    gamma: float = 1.0
    region_hold_threshold: float = 0.0
    attention_layers: tuple[int, int] = (0, 4)  # [start, stop) global block indices averaged
    text_positions: str = "all"  # 'all' instruction words, or 'keyword' (the world's keyword span / --query)
    filter: str = "gaussian"
    filter_sigma: float = 1.0
    filter_radius: int = 1
    keep_peaks: bool = True
    map_scaling: str = "minmax"  # attention_maps.SCALINGS: how the consolidated map is rescaled to [0, 1]
    # 'joint': the paper's text->image maps of the joint attention blocks; 'text_cross': each image token's attention
    # on the selected words in the text cross-attention blocks (needs model.text_cross_attention); 'token_change':
    # the sigmoid of the token change head, a full-resolution probability (needs model.token_change_head; the layer
    # range and text positions do not apply).
    attention_source: str = "joint"
    # Keep the source's own pixels in every token cell whose output token is the source token (held or copied), so
    # untouched regions are the input exactly instead of its tokenizer reconstruction. Not in EditMGT; edit stage only.
    paste_source: bool = False

    @classmethod
    def from_config(cls, config, **overrides) -> SamplingSettings:
        reject_unsupported(overrides, [field.name for field in dataclasses.fields(cls)], "EditMGT", "flow editor")
        values = {field.name: config.get(field.name, field.default) for field in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["attention_layers"] = tuple(int(v) for v in values["attention_layers"])
        if values["filter"] not in attention_maps.SMOOTHING_METHODS:
            raise ValueError(f"filter must be one of {attention_maps.SMOOTHING_METHODS}, got {values['filter']!r}")
        if values["map_scaling"] not in attention_maps.SCALINGS:
            raise ValueError(f"map_scaling must be one of {attention_maps.SCALINGS}, got {values['map_scaling']!r}")
        if values["attention_source"] not in ATTENTION_SOURCES:
            raise ValueError(f"attention_source must be one of {ATTENTION_SOURCES}, got {values['attention_source']!r}")
        if values["text_positions"] not in ("all", "keyword"):
            raise ValueError(f"text_positions must be 'all' or 'keyword', got {values['text_positions']!r}")
        if int(values["num_steps"]) < 1:
            raise ValueError("num_steps must be >= 1")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class EditMGT:
    """The modules of an EditMGT model (stateless; parameters are passed in).

    params = {'mgt': ..., 'text_encoder': ...} (+ 'gate_text_encoder'); model_state = {'tokenizer': VQ variables}.
    `gate_text_encoder` (config `text.gate_encoder`) is a second text encoder, frozen at init (no gradient reaches
    it), whose states only the MGT's text cross-attention reads (`MaskedGenerativeTransformer.gate_text_dim`).
    """

    mgt: MaskedGenerativeTransformer
    text_encoder: TextEncoder
    vq: VQModel
    text_tokenizer: WordTokenizer
    image_size: int
    stage: str = "edit"
    gate_text_encoder: TextEncoder | None = None

    @property
    def token_grid(self) -> int:
        return self.image_size // self.vq.downsample_factor

    @property
    def caption_change_head(self) -> CaptionChangeHead:
        """The head of `loss.caption_change_weight` (params under 'caption_change_head')."""
        return CaptionChangeHead(self.text_tokenizer.vocab_size)

    @property
    def uses_condition(self) -> bool:
        return self.stage == "edit"

    def micro_conds(self, batch_size: int) -> jax.Array:
        values = jnp.asarray([self.image_size, self.image_size, 0.0, 0.0, AESTHETIC_SCORE], jnp.float32)
        return jnp.broadcast_to(values, (batch_size, 5))

    def encode_images(self, model_state: PyTree, images_uint8: jax.Array) -> jax.Array:
        """uint8 `[B, H, W, 3]` -> tokens `[B, h, w]` int32 (frozen tokenizer)."""
        variables = jax.lax.stop_gradient(model_state["tokenizer"])
        return self.vq.apply(variables, images_to_float(images_uint8), method=VQModel.encode).astype(jnp.int32)

    def decode_tokens(self, model_state: PyTree, tokens: jax.Array) -> jax.Array:
        """tokens `[B, h, w]` -> uint8 images `[B, H, W, 3]`."""
        images = self.vq.apply(model_state["tokenizer"], tokens, method=VQModel.decode_indices)
        return float_to_uint8(images)

    def code_features(self, model_state: PyTree) -> jax.Array | None:
        """The frozen VQ codebook `[V, F]` the MGT reads with `code_content_dim > 0` (else None)."""
        if not self.mgt.code_content_dim:
            return None
        return self.vq.apply(jax.lax.stop_gradient(model_state["tokenizer"]), method=VQModel.code_vectors)

    def encode_text(self, params: PyTree, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids, mask `[B, Lt]` -> (hidden `[B, Lt, Dt]`, or `[B, Lt, Dt + Dg]` with the gate's frozen text appended;
        pooled `[B, P]`)."""
        hidden, pooled = self.text_encoder.apply({"params": params["text_encoder"]}, ids, mask)
        if self.gate_text_encoder is not None:
            gate_hidden, _ = self.gate_text_encoder.apply({"params": params["gate_text_encoder"]}, ids, mask)
            hidden = jnp.concatenate([hidden, jax.lax.stop_gradient(gate_hidden)], axis=-1)
        return hidden, pooled

    def prepare_batch(self, batch: Batch) -> Batch:
        """Host-side: tokenizes the stage's text ('instruction' for edit, 'target_caption' for t2i)."""
        return tokenize_text(self.text_tokenizer, batch, self.stage)

    def logits(
        self,
        params: PyTree,
        tokens: jax.Array,
        text: tuple[jax.Array, jax.Array, jax.Array],
        timestep: jax.Array,
        cond_tokens: jax.Array | None,
        *,
        gamma: float | jax.Array | None = None,
        capture_layers: tuple[int, ...] = (),
        model_state: PyTree | None = None,
        sown: tuple[str, ...] = (),
    ) -> tuple[jax.Array, ...]:
        """MGT logits `[B, h, w, V]` and, if `capture_layers`, attention probabilities `[N, B, heads, L, L]`
        (else None); with `sown` names, also a dict of those sown values: 'copy_score' `[B, h, w]` (needs
        `source_copy` and `cond_tokens`), 'content_prediction' `[B, h, w, F]` (needs `content_head`),
        'pixel_prediction' `[B, h, w, N, C]` (needs `pixel_channels`), a submodule's value by path, e.g.
        'text_cross_blocks_1/text_gate' `[B, g]` (needs `text_cross_attention`).

        `model_state` (the frozen tokenizer) is needed when the MGT reads code content (`code_content_dim > 0`).
        """
        hidden, mask, pooled = text
        args = (tokens, hidden, mask, pooled, timestep, self.micro_conds(tokens.shape[0]))
        codes = None if model_state is None else self.code_features(model_state)
        kwargs = dict(cond_tokens=cond_tokens, gamma=gamma, capture_layers=capture_layers, code_features=codes)
        variables = {"params": params["mgt"]}
        if not capture_layers and not sown:
            return self.mgt.apply(variables, *args, **kwargs), None
        logits, intermediates = self.mgt.apply(variables, *args, **kwargs, mutable=["intermediates"])
        intermediates = intermediates["intermediates"]
        probs = captured_attention(self.mgt, intermediates, capture_layers) if capture_layers else None
        if not sown:
            return logits, probs
        values = {}
        for name in sown:
            value = intermediates
            for part in name.split("/"):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is None:
                raise ValueError(f"the model sowed no {name!r}: 'copy_score' needs source_copy and cond_tokens, "
                                 "'content_prediction' needs content_head, 'pixel_prediction' needs pixel_head, "
                                 "'text_cross_blocks_i/text_gate' needs text_cross_attention")  # fmt: skip
            values[name] = value[0]
        return logits, probs, values


def tokenize_text(text_tokenizer: WordTokenizer, batch: Batch, stage: str) -> Batch:
    """Adds 'text_ids', 'text_mask' and 'keyword_mask' [B, Lt] to a host batch: the 'instruction' (with its
    'keyword_span' when present) for stage 'edit', the 'target_caption' for 't2i'. An edit batch with both captions
    also gets 'caption_change' [B, vocab_size]: target minus source caption word counts (`CaptionChangeHead`)."""
    batch = dict(batch)
    if stage == "edit":
        texts = [str(t) for t in batch["instruction"]]
        spans = np.asarray(batch["keyword_span"]) if "keyword_span" in batch else None
    else:
        texts = [str(t) for t in batch["target_caption"]]
        spans = None
    encoded = text_tokenizer.encode(texts, spans)
    batch["text_ids"] = encoded["ids"]
    batch["text_mask"] = encoded["mask"]
    batch["keyword_mask"] = encoded["span_mask"]
    if stage == "edit" and "source_caption" in batch and "target_caption" in batch:
        batch["caption_change"] = text_tokenizer.bag_of_words([str(t) for t in batch["target_caption"]]) - (
            text_tokenizer.bag_of_words([str(t) for t in batch["source_caption"]])
        )
    return batch


def _mask_tokens(
    rng: jax.Array,
    tokens: jax.Array,
    mask_token_id: int,
    changed: jax.Array | None = None,
    focus_prob: float = 0.0,
    min_mask_rate: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks each row at an arccos-distributed rate; returns (inputs, masked [B, L] bool, fraction masked [B]).

    With `changed` `[B, L]` (target tokens that differ from the source) and `focus_prob` > 0, a row is drawn with
    probability `focus_prob` as a *focused* row: all its changed tokens are masked on top of the random ones, the
    state a sampler that reveals its confident copies of unchanged tokens first is in when it reaches the edit.
    `min_mask_rate` truncates the rate's density to [min_mask_rate, 1] (`maskgit.sample_mask_rate`).
    """
    batch, length = tokens.shape
    rate_rng, order_rng = jax.random.split(rng)
    rate = maskgit.sample_mask_rate(rate_rng, (batch,), min_mask_rate)  # [B]
    num_masked = jnp.clip(jnp.ceil(rate * length), 1, length).astype(jnp.int32)  # [B]
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(order_rng, (batch, length)), axis=-1), axis=-1)  # [B, L]
    masked = ranks < num_masked[:, None]
    if changed is not None and focus_prob > 0.0:
        focused = jax.random.uniform(jax.random.fold_in(rng, 1), (batch,)) < focus_prob  # [B]
        masked = masked | (changed & focused[:, None])
    inputs = jnp.where(masked, mask_token_id, tokens)
    return inputs, masked, jnp.mean(masked.astype(jnp.float32), axis=-1)


def _empty_text(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.zeros_like(ids), jnp.zeros_like(mask)


def make_loss(model: EditMGT, *, cfg_dropout: float = 0.1, edit_weight: float = 1.0, focus_prob: float = 0.0,
              min_mask_rate: float = 0.0,
              grounding_weight: float = 0.0, content_weight: float = 0.0, text_gate_weight: float = 0.0,
              code_smoothing: float = 0.0, pixel_weight: float = 0.0,
              caption_change_weight: float = 0.0, changed_row_balance: bool = False,
              changed_row_power: float = 1.0, token_change_weight: float = 0.0,
              train_text_encoder: bool = True):  # fmt: skip
    """The masked-token loss `(params, model_state, batch, rng) -> (loss, LossAux)`.

    `train_text_encoder` False stops the gradient at the text encoder's outputs (config `text.train_encoder`).

    `edit_weight` multiplies the cross-entropy of masked target tokens that differ from the source tokens (edit
    stage only); 1.0 is the paper's plain average. Copying dominates the plain loss (most tokens are unchanged), so
    a weight > 1 makes short CPU schedules learn the edits sooner. `focus_prob` is the share of rows whose changed
    tokens are all masked (`_mask_tokens`; edit stage only). `min_mask_rate` > 0 draws the masking rate from the
    arccos density truncated to [min_mask_rate, 1]: 1 trains only the all-masked state the one-step editor decodes
    from (not in EditMGT). `grounding_weight` > 0 adds a dense "which tokens does
    the instruction change" loss: binary cross-entropy of the source-copy score (its sigmoid read as P(target
    token = source token)) on masked tokens, so the model is told per token whether the named object is there
    (needs `model.source_copy`; edit stage only; not in EditMGT). `content_weight` > 0 adds the squared error of
    the MGT's `content_head` prediction against the target token's standardized code vector (mean over features),
    weighted like the cross-entropy (masked tokens, changed ones by `edit_weight`; not in EditMGT).
    `text_gate_weight` > 0 supervises where the text is read: the binary cross-entropy of every text cross-attention
    block's gate (`1 - p(null)` per grid position, `nn.transformer.TextCrossAttention`) against "a token of this grid
    cell changes" (source vs target tokens), over all positions of the rows that kept their text (needs
    `model.text_cross_attention`; edit stage only; not in EditMGT). With `model.text_code_token_gate` it adds the
    binary cross-entropy of the text score's token gate against the changed tokens (mean over tokens and text rows;
    metric 'text_token_gate_loss').
    `token_change_weight` > 0 adds the binary cross-entropy of `model.token_change_head`'s logit against the changed
    tokens, mean over the tokens of the rows that kept their text (metrics 'token_change_loss' and
    'token_change_accuracy'; edit stage only; not in EditMGT).
    `code_smoothing` = tau > 0 replaces each token's one-hot target by soft targets over the codebook,
    q(k) proportional to exp(-d(k, y) / tau) with d the mean squared difference of the standardized code vectors
    (for the patch VQ, of the 2x2 pixel blocks): a near-miss code gets partial credit (needs `model.code_content`;
    not in EditMGT). The metrics stay those of the one-hot target.
    `pixel_weight` > 0 adds the squared error of the pixel head's predicted block (`model.pixel_head`) against the
    target code's pixels (mean over pixels and channels), weighted like the cross-entropy (not in EditMGT).
    `changed_row_balance` gives every row's masked changed tokens the same total weight (the batch's mean per row),
    so a recolor that changes 4 tokens weighs as much as a background edit that changes 40; the changed tokens'
    total weight in the batch is unchanged (`balance_changed_rows`; not in EditMGT). `changed_row_power` < 1 balances
    partially: a row's changed tokens then weigh in proportion to `count ** (1 - power)`.
    `caption_change_weight` > 0 adds `text.encoder.caption_change_loss`: the 'caption_change_head' params predict
    the batch's 'caption_change' (target minus source caption word counts) from the pooled instruction embedding, on
    the rows that kept their text (edit stage only; not in EditMGT).
    """
    if grounding_weight > 0 and not (model.uses_condition and model.mgt.source_copy):
        raise ValueError("loss.grounding_weight > 0 needs the edit stage and model.source_copy")
    if content_weight > 0 and not model.mgt.content_head:
        raise ValueError("loss.content_weight > 0 needs model.code_content (the MGT then gets its content_head)")
    if code_smoothing > 0 and not model.mgt.code_content_dim:
        raise ValueError("loss.code_smoothing > 0 needs model.code_content (the codebook's vectors)")
    if pixel_weight > 0 and not model.mgt.pixel_channels:
        raise ValueError("loss.pixel_weight > 0 needs model.pixel_head")
    if text_gate_weight > 0 and not (model.uses_condition and model.mgt.text_cross_attention):
        raise ValueError("loss.text_gate_weight > 0 needs the edit stage and model.text_cross_attention")
    if token_change_weight > 0 and not (model.uses_condition and model.mgt.token_change_head):
        raise ValueError("loss.token_change_weight > 0 needs the edit stage and model.token_change_head")
    if caption_change_weight > 0 and not model.uses_condition:
        raise ValueError("loss.caption_change_weight > 0 needs the edit stage (source and target captions)")
    gates = tuple(f"text_cross_blocks_{i}/text_gate" for i in range(model.mgt.num_text_cross_blocks))
    gates = gates if text_gate_weight else ()
    sown = (("copy_score",) if grounding_weight > 0 else ()) + (("content_prediction",) if content_weight > 0 else ())
    sown += (("pixel_prediction",) if pixel_weight > 0 else ()) + gates
    token_gate = text_gate_weight > 0 and model.mgt.text_code_token_gate
    sown += ("text_token_gate_logit",) if token_gate else ()
    sown += ("token_change_logit",) if token_change_weight > 0 else ()

    def loss(params, model_state, batch, rng):
        mask_rng, drop_rng = jax.random.split(rng)
        target = model.encode_images(model_state, batch["target_image"])  # [B, h, w]
        batch_size, height, width = target.shape
        cond = model.encode_images(model_state, batch["source_image"]) if model.uses_condition else None
        labels = target.reshape(batch_size, -1)  # [B, L]
        changed_tokens = None if cond is None else labels != cond.reshape(batch_size, -1)  # [B, L]
        inputs, masked, fraction = _mask_tokens(
            mask_rng,
            labels,
            model.mgt.mask_token_id,
            changed=changed_tokens,
            focus_prob=focus_prob,
            min_mask_rate=min_mask_rate,
        )
        drop = jax.random.uniform(drop_rng, (batch_size,)) < cfg_dropout  # [B]
        ids = jnp.where(drop[:, None], 0, batch["text_ids"])
        text_mask = batch["text_mask"] & ~drop[:, None]
        hidden, pooled = model.encode_text(params, ids, text_mask)
        if not train_text_encoder:
            hidden, pooled = jax.lax.stop_gradient((hidden, pooled))
        outputs = model.logits(
            params,
            inputs.reshape(batch_size, height, width),
            (hidden, text_mask, pooled),
            fraction,
            cond,
            model_state=model_state,
            sown=sown,
        )
        logits = outputs[0].reshape(batch_size, height * width, -1).astype(jnp.float32)  # [B, L, V]
        if code_smoothing > 0:
            soft_targets = code_soft_targets(model.code_features(model_state), code_smoothing)[labels]  # [B, L, V]
            ce = optax.softmax_cross_entropy(logits, soft_targets)  # [B, L]
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B, L]
        masked_f = masked.astype(jnp.float32)  # [B, L]
        weights = masked_f
        correct = (argmax_last(logits) == labels).astype(jnp.float32)
        metrics = {
            "masked_accuracy": jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0),
            "mask_rate": jnp.mean(fraction),
        }
        if cond is not None:
            changed_masked = changed_tokens.astype(jnp.float32) * weights  # [B, L]
            metrics["changed_accuracy"] = jnp.sum(correct * changed_masked) / jnp.maximum(jnp.sum(changed_masked), 1.0)
            balanced = (
                balance_changed_rows(changed_masked, changed_row_power) if changed_row_balance else changed_masked
            )  # [B, L]
            weights = weights - changed_masked + edit_weight * balanced
        total = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        if grounding_weight > 0:
            copy_score = outputs[2]["copy_score"].reshape(batch_size, -1).astype(jnp.float32)  # [B, L]
            kept = (~changed_tokens).astype(jnp.float32)  # [B, L]
            bce = optax.sigmoid_binary_cross_entropy(copy_score, kept)  # [B, L]
            grounding = jnp.sum(bce * masked_f) / jnp.maximum(jnp.sum(masked_f), 1.0)
            agree = ((copy_score > 0).astype(jnp.float32) == kept).astype(jnp.float32)
            metrics["grounding_loss"] = grounding
            metrics["grounding_accuracy"] = jnp.sum(agree * masked_f) / jnp.maximum(jnp.sum(masked_f), 1.0)
            total = total + grounding_weight * grounding
        if content_weight > 0:
            codes = standardize_code_features(model.code_features(model_state))  # [V, F]
            predicted = outputs[2]["content_prediction"].reshape(batch_size, height * width, -1)  # [B, L, F]
            squared = jnp.mean(jnp.square(predicted.astype(jnp.float32) - codes[labels]), axis=-1)  # [B, L]
            content = jnp.sum(squared * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            metrics["content_loss"] = content
            total = total + content_weight * content
        if pixel_weight > 0:
            blocks = code_pixel_blocks(model.code_features(model_state), model.mgt.pixel_channels)  # [V, N, C]
            predicted = outputs[2]["pixel_prediction"].reshape(batch_size, height * width, *blocks.shape[1:])
            squared = jnp.mean(jnp.square(predicted.astype(jnp.float32) - blocks[labels]), axis=(-2, -1))  # [B, L]
            metrics["pixel_loss"] = jnp.sum(squared * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            total = total + pixel_weight * metrics["pixel_loss"]
        if gates:
            grid = height // 2 if model.mgt.downsample else height  # a grid cell changes when any of its tokens does
            cells = cells_with_any(changed_tokens.reshape(batch_size, height, width), grid)  # [B, g]
            rows = (~drop).astype(jnp.float32)  # [B]: rows whose text was dropped read nothing
            per_block = [text_gate_bce(outputs[2][name], cells, rows) for name in gates]  # (loss, agreement) each
            metrics["text_gate_loss"] = sum(loss for loss, _ in per_block) / len(gates)
            metrics["text_gate_accuracy"] = per_block[-1][1]
            if token_gate:  # the text score's full-resolution gate against the changed tokens themselves
                token_logit = outputs[2]["text_token_gate_logit"].reshape(batch_size, -1)  # [B, L]
                metrics["text_token_gate_loss"], _ = changed_token_bce(token_logit, changed_tokens, rows)
                metrics["text_gate_loss"] = metrics["text_gate_loss"] + metrics["text_token_gate_loss"]
            total = total + text_gate_weight * metrics["text_gate_loss"]
        if token_change_weight > 0:
            change_logit = outputs[2]["token_change_logit"].reshape(batch_size, -1)  # [B, L]
            text_rows = (~drop).astype(jnp.float32)  # [B]: rows whose text was dropped cannot know the change
            metrics["token_change_loss"], metrics["token_change_accuracy"] = changed_token_bce(
                change_logit, changed_tokens, text_rows
            )
            total = total + token_change_weight * metrics["token_change_loss"]
        if caption_change_weight > 0:
            predicted = model.caption_change_head.apply({"params": params["caption_change_head"]}, pooled)  # [B, V]
            if "caption_change" not in batch:
                raise ValueError("loss.caption_change_weight > 0 needs batches with 'source_caption' and "
                                 "'target_caption' (EditMGT.prepare_batch turns them into 'caption_change')")  # fmt: skip
            change = batch["caption_change"]  # [B, V]
            loss_value, recall = caption_change_loss(predicted, change, ~drop)
            metrics["caption_change_loss"], metrics["caption_change_recall"] = loss_value, recall
            total = total + caption_change_weight * loss_value
        metrics["loss"] = total
        return total, LossAux(metrics=metrics, model_state=model_state)

    return loss


def balance_changed_rows(changed: jax.Array, power: float = 1.0) -> jax.Array:
    """Reweights `changed` `[B, L]` (0/1 masked changed tokens) per row by `count ** -power`, keeping the batch total.

    `power` 1 gives every row with changed tokens the batch's mean row sum; 0.5 is a partial balance (a row's total
    grows as the square root of its count); 0 returns `changed`. Rows without changed tokens stay 0.
    """
    counts = jnp.sum(changed, axis=1, keepdims=True)  # [B, 1]
    has_changes = counts > 0
    scale = jnp.where(has_changes, jnp.maximum(counts, 1.0) ** -power, 0.0)  # [B, 1]
    total = jnp.sum(counts)
    return changed * scale * (total / jnp.maximum(jnp.sum(counts * scale), 1e-12))


def code_soft_targets(code_features: jax.Array, tau: float) -> jax.Array:
    """`[V, V]` rows q(. | y) = softmax_k(-d(k, y) / tau), d the mean squared difference of the standardized code
    vectors `code_features [V, F]` (`standardize_code_features`); the codebook is frozen, so no gradient."""
    codes = jax.lax.stop_gradient(standardize_code_features(code_features)).astype(jnp.float32)  # [V, F]
    squared = jnp.sum(codes**2, axis=-1)  # [V]
    distance = (squared[:, None] + squared[None, :] - 2.0 * codes @ codes.T) / codes.shape[-1]  # [V, V]
    return jax.nn.softmax(-jnp.maximum(distance, 0.0) / tau, axis=-1)


def cells_with_any(mask: jax.Array, grid: int) -> jax.Array:
    """`[B, S, S]` mask (bool or 0/1) -> `[B, grid * grid]` float 0/1: a cell is 1 if any element in it is nonzero
    (changed tokens or edited pixels pooled to a token grid, e.g. for `text_gate_bce`)."""
    batch, size = mask.shape[0], mask.shape[1]
    if size % grid:
        raise ValueError(f"mask size {size} is not a multiple of the grid {grid}")
    cell = size // grid
    cells = (mask != 0).reshape(batch, grid, cell, grid, cell).any(axis=(2, 4))  # [B, grid, grid]
    return cells.reshape(batch, -1).astype(jnp.float32)


def text_gate_bce(gate: jax.Array, cells: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Binary cross-entropy of a text cross-attention gate `[B, g]` against edited cells `[B, g]` (0/1) over the
    rows `[B]` (0/1) that kept their text; returns (mean loss, mean agreement of gate > 0.5 with the cells)."""
    gate = jnp.clip(gate.astype(jnp.float32), 1e-6, 1 - 1e-6)
    bce = -(cells * jnp.log(gate) + (1 - cells) * jnp.log1p(-gate))  # [B, g]
    count = jnp.maximum(jnp.sum(rows) * cells.shape[1], 1.0)
    agree = ((gate > 0.5) == (cells > 0.5)).astype(jnp.float32)
    return jnp.sum(bce * rows[:, None]) / count, jnp.sum(agree * rows[:, None]) / count


def changed_token_bce(logit: jax.Array, changed: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sigmoid binary cross-entropy of per-token logits `[B, L]` against changed tokens `[B, L]` (bool) over the rows
    `[B]` (0/1) that kept their text; returns (mean loss, mean agreement of logit > 0 with the change), as
    `text_gate_bce` does for the grid-cell gates."""
    logit, changed = logit.astype(jnp.float32), changed.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logit, changed)  # [B, L]
    count = jnp.maximum(jnp.sum(rows) * bce.shape[1], 1.0)
    agree = ((logit > 0).astype(jnp.float32) == changed).astype(jnp.float32)
    return jnp.sum(bce * rows[:, None]) / count, jnp.sum(agree * rows[:, None]) / count


def make_edit_fn(model: EditMGT, settings: SamplingSettings):
    """Builds `edit(params, model_state, source_uint8, text_ids, text_mask, text_positions, rng, lam, gamma)`.

    One jitted function: encode the source, run S MaskGIT steps (each one MGT forward, CFG batched with the
    unconditional pass), consolidate text->image attention of `settings.attention_layers` over `text_positions`
    (joint attention, or with `attention_source='text_cross'` the image tokens' attention to those words in the
    text cross-attention blocks; with 'token_change' the token change head's probability instead),
    smooth it in-graph, hold regions below `lam`, decode the tokens. `lam` and `gamma` are traced (no recompiles
    for sweeps); the number of steps, filter and layer range are static.

    Returns a dict: images uint8 `[B, H, W, 3]`, tokens `[B, h, w]`, source_tokens, held `[B, h, w]` bool,
    attention `[B, h, w]` (the map averaged over steps), num_held `[B]`.
    """
    start, stop = settings.attention_layers
    text_cross = settings.attention_source == "text_cross"
    token_change = settings.attention_source == "token_change"
    if not token_change and not 0 <= start < stop <= model.mgt.num_blocks:
        raise ValueError(f"attention_layers {settings.attention_layers} outside [0, {model.mgt.num_blocks}]")
    if token_change:
        if not model.mgt.token_change_head:
            raise ValueError("attention_source 'token_change' needs a model with token_change_head")
        sown = ("token_change_logit",)
        capture = ()
    elif text_cross:
        if not model.mgt.text_cross_attention:
            raise ValueError("attention_source 'text_cross' needs a model with text_cross_attention")
        # Text cross-attention block i follows transformer block i: blocks start .. stop - 1 that have one.
        crossed = model.mgt.num_text_cross_blocks
        sown = tuple(f"text_cross_blocks_{i}/text_probs" for i in range(start, min(stop, crossed)))
        if not sown:
            raise ValueError(f"attention_layers {settings.attention_layers} has no text cross-attention block "
                             f"(blocks 0..{crossed - 1})")  # fmt: skip
        capture = ()
    else:
        sown = ()
        capture = tuple(range(start, stop))
    grid = model.token_grid
    inner_grid = grid // 2 if model.mgt.downsample else grid
    use_cfg = settings.guidance_scale != 0.0
    smooth = functools.partial(
        attention_maps.smooth,
        method=settings.filter,
        sigma=settings.filter_sigma,
        radius=settings.filter_radius,
        keep_peaks=settings.keep_peaks,
        scaling=settings.map_scaling,
    )

    def edit(params, model_state, source_uint8, text_ids, text_mask, text_positions, rng, lam, gamma):
        batch = source_uint8.shape[0]
        source = model.encode_images(model_state, source_uint8)  # [B, h, w]
        cond = source if model.uses_condition else None
        hidden, pooled = model.encode_text(params, text_ids, text_mask)
        text = (hidden, text_mask, pooled)
        if use_cfg:
            empty_ids, empty_mask = _empty_text(text_ids, text_mask)
            hidden_u, pooled_u = model.encode_text(params, empty_ids, empty_mask)
            text = tuple(
                jnp.concatenate(pair, axis=0) for pair in zip(text, (hidden_u, empty_mask, pooled_u), strict=True)
            )
            cond = None if cond is None else jnp.concatenate([cond, cond], axis=0)
        text_len = text_ids.shape[1]
        image_slice = slice(text_len, text_len + inner_grid * inner_grid)

        def logits_fn(tokens, step):
            del step
            tokens = tokens.reshape(batch, grid, grid)
            fraction = jnp.mean(tokens == model.mgt.mask_token_id, axis=(1, 2)).astype(jnp.float32)  # [B]
            if use_cfg:
                tokens, fraction = jnp.concatenate([tokens, tokens]), jnp.concatenate([fraction, fraction])
            outputs = model.logits(params, tokens, text, fraction, cond, gamma=gamma, capture_layers=capture,
                                   model_state=model_state, sown=sown)  # fmt: skip
            logits = outputs[0].reshape(outputs[0].shape[0], grid * grid, -1)
            uncond = logits[batch:] if use_cfg else None
            if token_change:  # a probability per token at full resolution: smoothed, not consolidated
                maps = jax.nn.sigmoid(outputs[2]["token_change_logit"][:batch].astype(jnp.float32))  # [B, h, w]
                return logits[:batch], uncond, smooth(maps).reshape(batch, -1)
            if text_cross:  # [N, B, 1, Lt, g]: image tokens' attention to the words, as text->image maps
                probs = jnp.stack([jnp.swapaxes(outputs[2][name][:batch], 1, 2)[:, None] for name in sown])
                consolidate_args = dict(image_slice=slice(0, inner_grid * inner_grid), sum_text=True)
            else:
                probs = outputs[1][:, :batch]  # text->image maps of the conditional pass
                consolidate_args = dict(image_slice=image_slice)
            maps = attention_maps.consolidate(
                probs,
                (0, len(probs)),
                text_positions,
                grid_shape=(inner_grid, inner_grid),
                scaling=settings.map_scaling,
                **consolidate_args,
            )  # [B, g, g]
            if inner_grid != grid:
                maps = jnp.repeat(jnp.repeat(maps, 2, axis=1), 2, axis=2)  # [B, h, w]
            scores = smooth(maps).reshape(batch, -1)  # [B, L]
            return logits[:batch], uncond, scores

        tokens, aux = maskgit.decode(
            logits_fn,
            source.reshape(batch, -1),
            num_steps=settings.num_steps,
            mask_token_id=model.mgt.mask_token_id,
            rng=rng,
            temperature=settings.temperature,
            token_temperature=None if settings.token_temperature < 0 else settings.token_temperature,
            guidance_scale=settings.guidance_scale,
            region_hold_threshold=lam,
        )
        tokens = tokens.reshape(batch, grid, grid)
        return {
            "images": decode_edit(model, model_state, tokens, source, source_uint8, settings.paste_source),
            "tokens": tokens,
            "source_tokens": source,
            "held": aux["held"].reshape(batch, grid, grid),
            "attention": jnp.mean(aux["scores"], axis=0).reshape(batch, grid, grid),
            "num_held": aux["num_held"],
        }

    return jax.jit(edit)


def decode_edit(model, model_state, tokens: jax.Array, source_tokens: jax.Array, source_uint8: jax.Array,
                paste_source: bool) -> jax.Array:  # fmt: skip
    """Edited tokens `[B, h, w]` -> uint8 images `[B, H, W, 3]`, with the source's own pixels in every cell whose token
    is the source token when `paste_source` (edit stage only; see `SamplingSettings.paste_source`)."""
    images = model.decode_tokens(model_state, tokens)
    if paste_source and model.uses_condition:
        images = paste_unchanged_cells(images, source_uint8, tokens == source_tokens)
    return images


def paste_unchanged_cells(images: jax.Array, source: jax.Array, unchanged: jax.Array) -> jax.Array:
    """Source pixels in the cells of unchanged tokens.

    Args:
      images: `[B, H, W, C]` decoded edit.
      source: `[B, H, W, C]` source image, same dtype.
      unchanged: `[B, h, w]` bool, True where the output token is the source token; H / h is the tokenizer's
        downsampling factor.

    Returns:
      `[B, H, W, C]`: `source` in every cell of an unchanged token, `images` elsewhere.
    """
    factor = images.shape[1] // unchanged.shape[1]
    keep = jnp.repeat(jnp.repeat(unchanged, factor, axis=1), factor, axis=2)[..., None]  # [B, H, W, 1]
    return jnp.where(keep, source, images)


def text_positions_for(batch: Batch, mode: str) -> np.ndarray:
    """`[B, Lt]` float weights of the text positions whose attention is consolidated."""
    if mode == "keyword":
        keyword = np.asarray(batch["keyword_mask"], bool)
        # Rows without a keyword (identity edits) fall back to every word.
        return np.where(keyword.any(axis=1, keepdims=True), keyword, np.asarray(batch["text_mask"], bool)).astype(
            np.float32
        )
    return np.asarray(batch["text_mask"], np.float32)


def run_edits(edit_fn, params, model_state, batch: Batch, settings: SamplingSettings, *, seed: int = 0,
              region_hold_threshold: float | None = None, gamma: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Runs `edit_fn` on a prepared host batch; returns host arrays."""
    lam = settings.region_hold_threshold if region_hold_threshold is None else region_hold_threshold
    gamma = settings.gamma if gamma is None else gamma
    out = edit_fn(
        params,
        model_state,
        jnp.asarray(batch["source_image"]),
        jnp.asarray(batch["text_ids"]),
        jnp.asarray(batch["text_mask"]),
        jnp.asarray(text_positions_for(batch, settings.text_positions)),
        jax.random.key(seed),
        jnp.float32(lam),
        jnp.float32(gamma),
    )
    return jax.device_get(out)


def score_edits(outputs: dict[str, np.ndarray], batch: Batch) -> dict[str, np.ndarray]:
    """Verifier success and preservation L1 (outside the edit mask, vs the source) per example."""
    from editing_jax.data.world import verifier

    result = verifier.verify(
        outputs["images"],
        [str(scene) for scene in batch["target_scene"]],
        sources=np.asarray(batch["source_image"]),
        edit_masks=np.asarray(batch["edit_mask"]),
    )
    return {"success": result.success.astype(np.float64), "preservation_l1": result.preservation_l1}


def evaluate_batches(
    edit_fn,
    params,
    model_state,
    batches: Iterable[Batch],
    settings: SamplingSettings,
    *,
    thresholds: dict[str, float],
    gamma: float | None = None,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Verifier success (overall, per edit type and per example) and preservation L1 for each named region-hold
    threshold."""
    per_setting: dict[str, dict[str, list]] = {name: {"success": [], "l1": [], "type": []} for name in thresholds}
    for index, batch in enumerate(batches):
        for name, lam in thresholds.items():
            outputs = run_edits(edit_fn, params, model_state, batch, settings, seed=seed + index,
                                region_hold_threshold=lam, gamma=gamma)  # fmt: skip
            scores = score_edits(outputs, batch)
            per_setting[name]["success"].extend(scores["success"].tolist())
            per_setting[name]["l1"].extend(scores["preservation_l1"].tolist())
            per_setting[name]["type"].extend(str(t) for t in batch["edit_type"])
        if progress is not None:
            progress.update(1)
    results = {}
    for name, values in per_setting.items():
        success, l1, types = np.asarray(values["success"]), np.asarray(values["l1"]), np.asarray(values["type"])
        results[name] = {
            "region_hold_threshold": thresholds[name],
            "num_examples": int(success.size),
            "verifier_success": float(success.mean()) if success.size else math.nan,
            "preservation_l1": float(np.nanmean(l1)) if l1.size else math.nan,
            "per_example_success": success.astype(int).tolist(),  # in split order, for `editing-jax compare`
            "per_example_edit_type": types.tolist(),
            "per_edit_type": {
                edit_type: {
                    "verifier_success": float(success[types == edit_type].mean()),
                    "preservation_l1": float(np.nanmean(l1[types == edit_type])),
                    "num_examples": int((types == edit_type).sum()),
                }
                for edit_type in sorted(set(types.tolist()))
            },
        }
    return results


def attention_to_rgb(maps: np.ndarray) -> np.ndarray:
    """[B, h, w] in [0, 1] -> [B, h, w, 3] float gray images."""
    return np.repeat(np.clip(np.asarray(maps, np.float32), 0.0, 1.0)[..., None], 3, axis=-1)


def make_objective(model: EditMGT, frozen_tokenizer: PyTree, *, cfg_dropout: float, settings: SamplingSettings,
                   eval_threshold: float, init_params: PyTree | None = None,
                   loss_options: dict[str, float | bool] | None = None) -> Objective:  # fmt: skip
    """The trainer objective. `frozen_tokenizer` are the VQ variables; `init_params` optionally replace the fresh
    'mgt' / 'text_encoder' params (a previous stage's run); `loss_options` are `make_loss`'s weights (edit_weight,
    focus_prob, grounding_weight, content_weight, text_gate_weight, caption_change_weight, ...)."""
    edit_fn = make_edit_fn(model, settings)
    if not model.uses_condition:
        eval_threshold = 0.0  # t2i has no source to hold regions of

    def init(rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        mgt_rng, text_rng = jax.random.split(rng)
        batch_size = batch["text_ids"].shape[0]
        text_inputs = (batch["text_ids"], batch["text_mask"])
        text_params = {"text_encoder": model.text_encoder.init(text_rng, *text_inputs)["params"]}
        if model.gate_text_encoder is not None:
            gate_rng = jax.random.fold_in(text_rng, 2)
            text_params["gate_text_encoder"] = model.gate_text_encoder.init(gate_rng, *text_inputs)["params"]
        hidden, pooled = model.encode_text(text_params, batch["text_ids"], batch["text_mask"])
        grid = model.token_grid
        tokens = jnp.zeros((batch_size, grid, grid), jnp.int32)
        mgt_params = model.mgt.init(
            mgt_rng,
            tokens,
            hidden,
            batch["text_mask"],
            pooled,
            jnp.ones((batch_size,), jnp.float32),
            model.micro_conds(batch_size),
            cond_tokens=tokens if model.uses_condition else None,
            code_features=model.code_features({"tokenizer": frozen_tokenizer}),
        )["params"]
        params = {"mgt": mgt_params, **text_params}
        if (loss_options or {}).get("caption_change_weight", 0.0) > 0:
            head_rng = jax.random.fold_in(text_rng, 1)
            params["caption_change_head"] = model.caption_change_head.init(head_rng, pooled)["params"]
        if init_params is not None:
            params = replace_params(params, init_params)
        return {"params": params, "tokenizer": frozen_tokenizer}

    def visualize(params, model_state, batch):
        batch = {k: v[:MAX_VISUALIZED_ROWS] for k, v in batch.items()}
        outputs = run_edits(edit_fn, params, model_state, batch, settings, region_hold_threshold=eval_threshold)
        rows = []
        for i in range(len(outputs["images"])):
            held = attention_to_rgb(outputs["held"][i : i + 1].astype(np.float32))[0]
            rows.append([
                np.asarray(batch["source_image"][i], np.float32) / 255.0,
                np.asarray(batch["target_image"][i], np.float32) / 255.0,
                outputs["images"][i].astype(np.float32) / 255.0,
                attention_to_rgb(outputs["attention"][i : i + 1])[0],
                held,
            ])  # fmt: skip
        return rows, ["source", "target", "output", "attention", "held"]

    def evaluate(params, model_state, batches):
        thresholds = {"plain": 0.0, "hold": eval_threshold} if model.uses_condition else {"plain": 0.0}
        results = evaluate_batches(edit_fn, params, model_state, batches, settings, thresholds=thresholds)
        metrics = {}
        for name, result in results.items():
            metrics[f"{name}/verifier_success"] = result["verifier_success"]
            metrics[f"{name}/preservation_l1"] = result["preservation_l1"]
        return metrics

    return Objective(
        name=f"editmgt_{model.stage}",
        init=init,
        loss=make_loss(model, cfg_dropout=cfg_dropout, **(loss_options or {})),
        visualize=visualize,
        evaluate=evaluate,
        prepare_batch=model.prepare_batch,
    )


# Learned position tables: a run with longer texts (t2i captions) initializes one with shorter texts (instructions)
# with its first rows, which are exactly the positions the shorter texts use.
PREFIX_LOADABLE = ("position_embedding",)


def replace_params(fresh: PyTree, loaded: PyTree) -> PyTree:
    """Takes `loaded` leaves wherever the tree paths and shapes match `fresh`; errors on a shape mismatch.

    `fresh` may hold Flax metadata boxes (`nn.LogicallyPartitioned` from `init`): a box takes the loaded value at its
    own path and keeps its metadata. A `PREFIX_LOADABLE` table `[L_loaded, D]` with L_loaded > L gives its first L
    rows. Leaves of `fresh` absent from `loaded` (new modules) are kept.
    """
    flat_loaded = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(loaded)}

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.meta.AxisMetadata):
            return leaf.replace_boxed(pick(path, leaf.unbox()))
        if key not in flat_loaded:
            return leaf
        value = flat_loaded[key]
        prefix_ok = key.endswith(tuple(f"['{name}']" for name in PREFIX_LOADABLE))
        if (
            prefix_ok
            and value.ndim == leaf.ndim == 2
            and value.shape[1] == leaf.shape[1]
            and value.shape[0] > leaf.shape[0]
        ):
            value = value[: leaf.shape[0]]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"init_from param {key} has shape {tuple(value.shape)}, expected {tuple(leaf.shape)}")
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, fresh, is_leaf=lambda node: isinstance(node, nn.meta.AxisMetadata))


# ---- building from a config ------------------------------------------------------------------------------------


def build_text_modules(text_config) -> tuple[WordTokenizer, TextEncoder]:
    """The offline word tokenizer and the trainable text encoder from a config's `text` section (vocab filled)."""
    tokenizer = WordTokenizer(
        tuple(text_config.vocab.split()),
        max_length=int(text_config.max_length),
        num_hash_buckets=int(text_config.num_hash_buckets),
    )
    text_encoder = TextEncoder(
        vocab_size=tokenizer.vocab_size,
        width=int(text_config.width),
        num_layers=int(text_config.num_layers),
        num_heads=int(text_config.num_heads),
        max_length=int(text_config.max_length),
        pooled_dim=int(text_config.pooled_dim),
        word_skip=bool(text_config.get("word_skip", False)),
    )
    return tokenizer, text_encoder


def build_model(config) -> EditMGT:
    """Modules from a (resolved) config: `tokenizer.model_json` and `text.vocab` must be filled."""
    from editing_jax.methods import module_kwargs

    if not config.tokenizer.model_json:
        raise ValueError("config.tokenizer.model_json is empty; build the objective first (it resolves it)")
    if config.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {config.stage!r}")
    vq = VQModel(**module_kwargs(json.loads(config.tokenizer.model_json)))
    tokenizer, text_encoder = build_text_modules(config.text)
    mgt_kwargs = module_kwargs(config.model)
    # `text.gate_encoder`: the text cross-attention reads a second, frozen text encoder (EditMGT.gate_text_encoder).
    gate_text_encoder = text_encoder if config.text.get("gate_encoder", False) else None
    mgt_kwargs["gate_text_dim"] = 0 if gate_text_encoder is None else text_encoder.width
    # `model.code_content` (bool) feeds the VQ codebook to the MGT (see MaskedGenerativeTransformer.code_content_dim).
    mgt_kwargs["code_content_dim"] = vq.code_dim if mgt_kwargs.pop("code_content", False) else 0
    # The content head exists only in runs trained with its loss, so older checkpoints keep their parameter tree.
    mgt_kwargs["content_head"] = float(config.loss.get("content_weight", 0.0)) > 0
    # `model.pixel_head` (bool) scores codes by their pixels (see MaskedGenerativeTransformer.pixel_channels).
    if mgt_kwargs.pop("pixel_head", False):
        if vq.decoder_type != "patch" or not mgt_kwargs["code_content_dim"]:
            raise ValueError("model.pixel_head needs model.code_content and a patch VQ tokenizer (its codes are "
                             "pixel blocks; configs/tokenizer/vq.py:patch)")  # fmt: skip
        mgt_kwargs["pixel_channels"] = vq.out_channels
    mgt = MaskedGenerativeTransformer(codebook_size=vq.codebook_size, **mgt_kwargs)
    size = int(config.data.size)
    if size % vq.downsample_factor:
        raise ValueError(f"image size {size} is not divisible by the tokenizer's downsampling {vq.downsample_factor}")
    grid = size // vq.downsample_factor
    if mgt.downsample and grid % 2:
        raise ValueError(f"model.downsample needs an even token grid, got {grid}")
    return EditMGT(mgt, text_encoder, vq, tokenizer, size, str(config.stage), gate_text_encoder)


def resolve_config(config) -> None:
    """Fills `tokenizer.model_json` (from the VQ run) and `text.vocab` (from the world) when empty."""
    resolve_tokenizer_and_vocab(config, expected_method="tokenizer_vq")


TOKENIZER_CONFIGS = {"tokenizer_vq": "configs/tokenizer/vq.py", "tokenizer_kl": "configs/tokenizer/kl.py"}


def resolve_tokenizer_and_vocab(config, *, expected_method: str) -> None:
    """Fills `tokenizer.model_json` from the frozen tokenizer run at `tokenizer.checkpoint` (which must be an
    `expected_method` run at the config's image size) and `text.vocab` from the world's grammar, when empty."""
    from editing_jax.text.tokenizer import world_vocabulary
    from editing_jax.train import checkpoint

    if not config.tokenizer.model_json:
        if not config.tokenizer.checkpoint:
            raise ValueError(f"set tokenizer.checkpoint to a trained {expected_method} run "
                             f"(editing-jax train --config {TOKENIZER_CONFIGS[expected_method]})")  # fmt: skip
        trained = checkpoint.load_trained(config.tokenizer.checkpoint)
        if trained.config.method != expected_method:
            raise ValueError(f"tokenizer.checkpoint {config.tokenizer.checkpoint} is a {trained.config.method} run, "
                             f"expected {expected_method}")  # fmt: skip
        if int(trained.config.data.size) != int(config.data.size):
            raise ValueError(
                f"the tokenizer was trained at {trained.config.data.size} px but data.size is {config.data.size}"
            )
        config.tokenizer.model_json = json.dumps(trained.config.model.to_dict())
    if not config.text.vocab:
        config.text.vocab = " ".join(world_vocabulary())


def build_objective(config) -> Objective:
    from editing_jax.train import checkpoint

    resolve_config(config)
    model = build_model(config)
    tokenizer_run = checkpoint.load_trained(config.tokenizer.checkpoint)
    frozen = {"params": tokenizer_run.inference_params, **tokenizer_run.model_state}
    init_params = None
    if config.init_from:
        init_params = checkpoint.load_trained(config.init_from).inference_params
    settings = SamplingSettings.from_config(config.sampling)
    return make_objective(
        model,
        frozen,
        cfg_dropout=float(config.loss.cfg_dropout),
        loss_options={
            name: value if isinstance(value, bool) else float(value)
            for name, value in config.loss.items()
            if name != "cfg_dropout"
        }
        | {"train_text_encoder": bool(config.text.get("train_encoder", True))},
        settings=settings,
        eval_threshold=float(config.sampling.region_hold_threshold),
        init_params=init_params,
    )
