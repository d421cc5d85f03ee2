"""EditMGT pieces: text tokenizer, MGT conditioning/attention bias, masked loss, and the jitted edit function."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from editing_jax import config_lib
from editing_jax.methods import editmgt
from editing_jax.models.mgt import MaskedGenerativeTransformer, gamma_bias, standardize_code_features
from editing_jax.models.vq import VQModel
from editing_jax.text.encoder import TextEncoder
from editing_jax.text.tokenizer import WordTokenizer

VOCAB = ("a", "blue", "circle", "make", "red", "the")


def test_tokenizer_ids_spans_and_unknown_words():
    tok = WordTokenizer(VOCAB, max_length=6, num_hash_buckets=8)
    out = tok.encode(["Make the RED circle blue", "make the zebra striped"], spans=[(9, 19), (0, 0)])
    assert out["ids"][0].tolist() == [4, 6, 5, 3, 2, 0]
    assert out["mask"][0].tolist() == [True] * 5 + [False]
    assert out["span_mask"][0].tolist() == [False, False, True, True, False, False]  # 'red circle'
    assert not out["span_mask"][1].any()
    unknown = out["ids"][1, 2:4]
    assert np.all(unknown > len(VOCAB)) and np.all(unknown < tok.vocab_size)
    again = tok.encode(["zebra striped"])["ids"][0, :2]
    np.testing.assert_array_equal(again, unknown)  # stable hashing
    assert tok.find_phrase(["make the red circle blue"], "red circle")[0].tolist() == [0, 0, 1, 1, 0, 0]
    assert tok.encode(["w " * 10])["mask"].sum() == 6  # truncated to max_length


def test_bag_of_words_counts_every_word_of_each_text():
    tok = WordTokenizer(VOCAB, max_length=3, num_hash_buckets=4)
    counts = tok.bag_of_words(["the red circle, the blue circle and a zebra", ""])
    assert counts.shape == (2, tok.vocab_size)
    assert counts[0, tok.word_id("circle")] == 2 and counts[0, tok.word_id("the")] == 2
    assert counts[0, tok.word_id("zebra")] == 1 and tok.word_id("zebra") > len(VOCAB)  # a hashed bucket
    assert counts[0].sum() == 9  # not cut at max_length
    assert counts[1].sum() == 0 and counts[:, 0].sum() == 0  # nothing counts as padding


def test_text_encoder_word_skip_adds_each_words_normalized_embedding():
    tokenizer = WordTokenizer(VOCAB, max_length=6, num_hash_buckets=4)
    encoded = tokenizer.encode(["make the red circle blue", "make the red circle"], None)
    ids, mask = jnp.asarray(encoded["ids"]), jnp.asarray(encoded["mask"])
    kwargs = dict(width=16, num_layers=1, num_heads=2, max_length=6, pooled_dim=8)
    skip = TextEncoder(tokenizer.vocab_size, word_skip=True, **kwargs)
    variables = skip.init(jax.random.key(0), ids, mask)
    params = nn.unbox(variables["params"])
    assert "word_norm" in params
    hidden, _ = skip.apply(variables, ids, mask)
    plain_params = {k: v for k, v in params.items() if k != "word_norm"}
    plain_hidden, _ = TextEncoder(tokenizer.vocab_size, **kwargs).apply({"params": plain_params}, ids, mask)
    words = np.asarray(params["token_embedding"]["embedding"], np.float64)[np.asarray(ids)]  # [B, L, D]
    normalized = (words - words.mean(-1, keepdims=True)) / np.sqrt(words.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(hidden) - np.asarray(plain_hidden), normalized, rtol=1e-3, atol=1e-4)


def test_gamma_bias_blocks():
    bias = np.asarray(gamma_bias(2.0, 2, 3, 3))
    assert bias.shape == (8, 8)
    np.testing.assert_allclose(bias[2:5, 5:8], np.log(2.0))
    np.testing.assert_allclose(bias[5:8, 2:5], np.log(2.0))
    np.testing.assert_allclose(bias[:2, 5:8], np.log(2.0))  # text -> cond (no leak through the text stream)
    assert np.all(bias[:, :2] == 0) and np.all(bias[2:5, 2:5] == 0) and np.all(bias[5:8, 5:8] == 0)
    assert np.all(bias[:2, :5] == 0)
    assert np.all(np.asarray(gamma_bias(0.0, 2, 3, 3))[2:5, 5:8] <= -1e8)


@pytest.fixture(scope="module")
def tiny_mgt():
    model = MaskedGenerativeTransformer(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                        embed_dim=8, downsample=True, axes_dims_rope=(2, 2, 4),
                                        zero_init_modulation=False)  # fmt: skip
    batch, text_len = 2, 5
    rng = np.random.default_rng(0)
    inputs = dict(
        tokens=jnp.asarray(rng.integers(0, 17, (batch, 4, 4)), jnp.int32),
        text_hidden=jnp.asarray(rng.normal(size=(batch, text_len, 12)), jnp.float32),
        text_mask=jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
        pooled_text=jnp.asarray(rng.normal(size=(batch, 6)), jnp.float32),
        timestep=jnp.asarray([0.3, 0.9], jnp.float32),
        micro_conds=jnp.ones((batch, 5), jnp.float32),
    )
    cond = jnp.asarray(rng.integers(0, 16, (batch, 4, 4)), jnp.int32)
    variables = model.init(jax.random.key(0), **inputs, cond_tokens=cond)
    return model, variables, inputs, cond


def test_gamma_zero_removes_the_condition_exactly(tiny_mgt):
    model, variables, inputs, cond = tiny_mgt
    other = (cond + 5) % 16
    a = model.apply(variables, **inputs, cond_tokens=cond, gamma=0.0)
    b = model.apply(variables, **inputs, cond_tokens=other, gamma=0.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model.apply(variables, **inputs, cond_tokens=other, gamma=1.0)
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert a.shape == (2, 4, 4, 16)  # logits over the codebook only: the mask token is never predicted
    # gamma = 1 adds log(1) = 0: identical to no bias at all.
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, **inputs, cond_tokens=cond, gamma=1.0)),
        np.asarray(model.apply(variables, **inputs, cond_tokens=cond)),
        atol=1e-6,
    )


def test_padded_text_is_ignored(tiny_mgt):
    model, variables, inputs, cond = tiny_mgt
    changed = dict(inputs, text_hidden=inputs["text_hidden"].at[0, 3:].set(100.0))  # padded positions of row 0
    a = model.apply(variables, **inputs, cond_tokens=cond)
    b = model.apply(variables, **changed, cond_tokens=cond)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-5)


def test_attention_capture_is_off_by_default(tiny_mgt):
    model, variables, inputs, cond = tiny_mgt
    _, sown = model.apply(variables, **inputs, cond_tokens=cond, mutable=["intermediates"])
    assert not sown.get("intermediates")
    _, sown = model.apply(variables, **inputs, cond_tokens=cond, capture_layers=(1,), mutable=["intermediates"])
    assert list(sown["intermediates"]) == ["single_transformer_blocks_0"]


def test_mask_tokens_follows_the_rate():
    tokens = jnp.arange(64, dtype=jnp.int32).reshape(1, 64).repeat(256, axis=0) % 16
    inputs, masked, fraction = editmgt._mask_tokens(jax.random.key(0), tokens, 16)
    counts = np.asarray(masked.sum(-1))
    np.testing.assert_allclose(counts / 64, np.asarray(fraction))
    assert counts.min() >= 1
    np.testing.assert_array_equal(np.asarray(inputs)[~np.asarray(masked)], np.asarray(tokens)[~np.asarray(masked)])
    assert np.all(np.asarray(inputs)[np.asarray(masked)] == 16)
    # Arccos density: E[r] = 2/pi ~ 0.64 (vs 0.5 for uniform).
    assert abs(float(np.mean(fraction)) - 2 / np.pi) < 0.05


def test_min_mask_rate_one_masks_every_token():
    tokens = jnp.arange(64, dtype=jnp.int32).reshape(1, 64).repeat(32, axis=0) % 16
    inputs, masked, fraction = editmgt._mask_tokens(jax.random.key(0), tokens, 16, min_mask_rate=1.0)
    assert np.all(np.asarray(masked)) and np.all(np.asarray(inputs) == 16)
    np.testing.assert_array_equal(np.asarray(fraction), 1.0)
    _, half, _ = editmgt._mask_tokens(jax.random.key(0), tokens, 16, min_mask_rate=0.5)
    assert np.asarray(half).mean(-1).min() >= 0.5


def test_focused_rows_mask_every_changed_token():
    tokens = jnp.arange(64, dtype=jnp.int32).reshape(1, 64).repeat(256, axis=0) % 16  # [256, 64]
    changed = jax.random.uniform(jax.random.key(1), tokens.shape) < 0.2  # [256, 64]
    rng = jax.random.key(0)
    _, plain, _ = editmgt._mask_tokens(rng, tokens, 16)
    _, unfocused, _ = editmgt._mask_tokens(rng, tokens, 16, changed=changed, focus_prob=0.0)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(unfocused))
    inputs, masked, fraction = editmgt._mask_tokens(rng, tokens, 16, changed=changed, focus_prob=0.5)
    masked, plain, changed = np.asarray(masked), np.asarray(plain), np.asarray(changed)
    assert np.all(masked >= plain)  # focusing only adds masks
    assert np.all(masked[~changed] == plain[~changed])  # ... and only on changed tokens
    covered = np.all(masked | ~changed, axis=-1)  # rows whose changed tokens are all masked
    covered_by_chance = np.all(plain | ~changed, axis=-1)
    # Half the rows are focused; the others cover their changed tokens only by chance (high masking rates).
    expected = 0.5 + 0.5 * covered_by_chance.mean()
    assert abs(covered.mean() - expected) < 0.1 and covered.mean() > covered_by_chance.mean() + 0.3
    np.testing.assert_allclose(masked.mean(-1), np.asarray(fraction), rtol=1e-6)
    assert np.all(np.asarray(inputs)[masked] == 16)
    _, all_focused, _ = editmgt._mask_tokens(rng, tokens, 16, changed=jnp.asarray(changed), focus_prob=1.0)
    assert np.all(np.asarray(all_focused)[changed])


def test_code_content_reads_the_codebook_up_to_scale(tiny_mgt):
    _, _, inputs, cond = tiny_mgt
    model = MaskedGenerativeTransformer(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                        embed_dim=8, downsample=True, axes_dims_rope=(2, 2, 4),
                                        zero_init_modulation=False, code_content_dim=3)  # fmt: skip
    codes = jax.random.normal(jax.random.key(4), (16, 3))
    variables = model.init(jax.random.key(0), **inputs, cond_tokens=cond, code_features=codes)
    assert {"content_embed", "content_key_in", "content_key_out", "content_query"} <= set(variables["params"])

    def logits(features):
        return np.asarray(model.apply(variables, **inputs, cond_tokens=cond, code_features=features))

    base = logits(codes)
    # Features are standardized per dimension, so a per-dimension affine change of the codebook is invisible ...
    np.testing.assert_allclose(logits(codes * jnp.array([2.0, 0.5, 3.0]) + 1.0), base, rtol=1e-4, atol=1e-4)
    # ... while a different codebook (here two codes' vectors swapped) changes the prediction.
    swapped = codes.at[jnp.array([0, 1])].set(codes[jnp.array([1, 0])])
    assert np.abs(logits(swapped) - base).max() > 1e-3
    with pytest.raises(ValueError, match="code_features"):
        model.apply(variables, **inputs, cond_tokens=cond)


def test_editmgt_feeds_the_vq_codebook_as_code_content():
    model, objective, variables, batch = _tiny_editor(code_content=True)
    state = {"tokenizer": variables["tokenizer"]}
    assert model.mgt.code_content_dim == 4 and model.code_features(state).shape == (16, 4)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    loss, _ = objective.loss(variables["params"], state, device_batch, jax.random.key(3))
    assert np.isfinite(float(loss))
    settings = editmgt.SamplingSettings(num_steps=2, attention_layers=(0, 2))
    out = editmgt.run_edits(editmgt.make_edit_fn(model, settings), variables["params"], state, batch, settings)
    assert out["images"].shape == (2, 8, 8, 3)


def _tiny_editor(
    stage="edit",
    code_content=False,
    source_copy=False,
    content_head=False,
    text_cross=False,
    pixel_head=False,
    token_gate=False,
    token_change=False,
    gate_encoder=False,
    loss_options=None,
):
    if pixel_head:  # the patch VQ: a code is a 2x2 pixel block (F = 12)
        vq = VQModel(encoder_type="patch", decoder_type="patch", patch_size=2, codebook_size=16, code_dim=12)
    else:
        vq = VQModel(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, mid_block_attention=False,
                     latent_channels=4, codebook_size=16, code_dim=4)  # fmt: skip
    content_dim = vq.code_dim if code_content or pixel_head or token_gate else 0
    tokenizer = WordTokenizer(VOCAB, max_length=6, num_hash_buckets=4)
    text_encoder = TextEncoder(tokenizer.vocab_size, width=16, num_layers=1, num_heads=2, max_length=6, pooled_dim=8)
    mgt = MaskedGenerativeTransformer(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                      embed_dim=8, downsample=True, axes_dims_rope=(2, 2, 4),
                                      zero_init_modulation=False, code_content_dim=content_dim,
                                      source_copy=source_copy, content_head=content_head,
                                      text_cross_attention=text_cross or token_gate,
                                      text_code_score=token_gate, text_code_token_gate=token_gate,
                                      token_change_head=token_change,
                                      gate_text_dim=text_encoder.width if gate_encoder else 0,
                                      pixel_channels=3 if pixel_head else 0)  # fmt: skip
    model = editmgt.EditMGT(mgt, text_encoder, vq, tokenizer, image_size=8, stage=stage,
                            gate_text_encoder=text_encoder if gate_encoder else None)  # fmt: skip
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    vq_vars = vq.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
    objective = editmgt.make_objective(model, vq_vars, cfg_dropout=0.5, settings=editmgt.SamplingSettings(
        num_steps=3, attention_layers=(0, 2)), eval_threshold=0.3, loss_options=loss_options)  # fmt: skip
    batch = model.prepare_batch({
        "source_image": images,
        "target_image": images[::-1].copy(),
        "instruction": np.asarray(["make the red circle blue", "make a circle"], object),
        "target_caption": np.asarray(["a blue circle", "a red circle"], object),
        "source_caption": np.asarray(["a red circle", "a red circle a red circle"], object),
        "keyword_span": np.asarray([[9, 19], [7, 13]], np.int32),
    })  # fmt: skip
    variables = objective.init(jax.random.key(2), {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object})
    return model, objective, variables, batch


@pytest.fixture(scope="module")
def tiny_editor():
    return _tiny_editor()


def test_loss_is_cross_entropy_on_masked_positions_only(tiny_editor):
    model, objective, variables, batch = tiny_editor
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    rng = jax.random.key(3)
    loss, aux = objective.loss(params, state, device_batch, rng)
    # Recompute by hand with the same random draws.
    mask_rng, drop_rng = jax.random.split(rng)
    target = model.encode_images(state, device_batch["target_image"]).reshape(2, -1)
    inputs, masked, fraction = editmgt._mask_tokens(mask_rng, target, 16)
    drop = jax.random.uniform(drop_rng, (2,)) < 0.5
    ids = jnp.where(drop[:, None], 0, device_batch["text_ids"])
    text_mask = device_batch["text_mask"] & ~drop[:, None]
    hidden, pooled = model.encode_text(params, ids, text_mask)
    cond = model.encode_images(state, device_batch["source_image"])
    logits, _ = model.logits(params, inputs.reshape(2, 4, 4), (hidden, text_mask, pooled), fraction, cond)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.reshape(2, 16, 16), target)
    expected = float(jnp.sum(ce * masked) / jnp.sum(masked))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux.metrics["mask_rate"]) == pytest.approx(float(jnp.mean(fraction)))
    grads = jax.grad(lambda p: objective.loss(p, state, device_batch, rng)[0])(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(optax.tree.norm(grads["text_encoder"])) > 0  # the text encoder is trained with the MGT


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_region_hold_extremes(tiny_editor, guidance):
    model, _, variables, batch = tiny_editor
    settings = editmgt.SamplingSettings(num_steps=3, attention_layers=(0, 2), guidance_scale=guidance)
    edit_fn = editmgt.make_edit_fn(model, settings)
    state = {"tokenizer": variables["tokenizer"]}
    plain = editmgt.run_edits(edit_fn, variables["params"], state, batch, settings, region_hold_threshold=0.0)
    assert not plain["held"].any()
    assert plain["images"].shape == (2, 8, 8, 3) and plain["images"].dtype == np.uint8
    assert plain["attention"].min() >= 0 and plain["attention"].max() <= 1
    hold_all = editmgt.run_edits(edit_fn, variables["params"], state, batch, settings, region_hold_threshold=1.5)
    assert hold_all["held"].all()
    np.testing.assert_array_equal(hold_all["tokens"], hold_all["source_tokens"])
    some = editmgt.run_edits(edit_fn, variables["params"], state, batch, settings, region_hold_threshold=0.5)
    held = some["held"]
    np.testing.assert_array_equal(some["tokens"][held], some["source_tokens"][held])
    assert 0 < held.sum() < held.size


def test_paste_source_keeps_input_pixels_exactly_where_the_source_token_is_kept(tiny_editor):
    model, _, variables, batch = tiny_editor
    state = {"tokenizer": variables["tokenizer"]}
    base = editmgt.SamplingSettings(num_steps=2, attention_layers=(0, 2))
    pasted = dataclasses.replace(base, paste_source=True)
    source = np.asarray(batch["source_image"])  # [2, 8, 8, 3]; 4x4 tokens, 2x2 pixels each
    for lam in (0.0, 0.5):
        plain = editmgt.run_edits(editmgt.make_edit_fn(model, base), variables["params"], state, batch, base,
                                  region_hold_threshold=lam)  # fmt: skip
        out = editmgt.run_edits(editmgt.make_edit_fn(model, pasted), variables["params"], state, batch, pasted,
                                region_hold_threshold=lam)  # fmt: skip
        np.testing.assert_array_equal(out["tokens"], plain["tokens"])
        kept = np.repeat(np.repeat(out["tokens"] == out["source_tokens"], 2, axis=1), 2, axis=2)  # [2, 8, 8]
        assert kept.any() and not kept.all()
        np.testing.assert_array_equal(out["images"][kept], source[kept])
        np.testing.assert_array_equal(out["images"][~kept], plain["images"][~kept])
        # The random tiny VQ reconstructs badly: without pasting, kept cells are not the input.
        assert np.abs(plain["images"][kept].astype(int) - source[kept]).max() > 0
    hold_all = editmgt.run_edits(editmgt.make_edit_fn(model, pasted), variables["params"], state, batch, pasted,
                                 region_hold_threshold=1.5)  # fmt: skip
    np.testing.assert_array_equal(hold_all["images"], source)


def test_token_change_head_is_trained_on_changed_tokens_and_is_the_token_change_hold_map():
    model, _, variables, batch = _tiny_editor(token_change=True)
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    rng = jax.random.key(4)
    plain, _ = editmgt.make_loss(model, cfg_dropout=0.0)(params, state, device_batch, rng)
    total, aux = editmgt.make_loss(model, cfg_dropout=0.0, token_change_weight=2.0)(params, state, device_batch, rng)
    # The loss's forward by hand (same rng splits, no text dropout), then the head's BCE in float64.
    mask_rng, _ = jax.random.split(rng)
    target = model.encode_images(state, device_batch["target_image"]).reshape(2, -1)
    source = model.encode_images(state, device_batch["source_image"])  # [2, 4, 4]
    changed = np.asarray(target != source.reshape(2, -1))
    assert changed.any() and not changed.all()
    inputs, _, fraction = editmgt._mask_tokens(mask_rng, target, 16, changed=jnp.asarray(changed))
    text_mask = device_batch["text_mask"]
    hidden, pooled = model.encode_text(params, device_batch["text_ids"], text_mask)
    _, _, sown = model.logits(params, inputs.reshape(2, 4, 4), (hidden, text_mask, pooled), fraction, source,
                              model_state=state, sown=("token_change_logit",))  # fmt: skip
    logit = np.asarray(sown["token_change_logit"], np.float64).reshape(2, -1)
    bce = np.logaddexp(0.0, logit) - changed * logit
    np.testing.assert_allclose(float(aux.metrics["token_change_loss"]), bce.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(total) - float(plain), 2.0 * bce.mean(), rtol=1e-4)
    # As the region-hold map: the head's probability of the one-step edit's forward (all target tokens masked).
    settings = editmgt.SamplingSettings(num_steps=1, attention_source="token_change", filter="none", keep_peaks=False,
                                        map_scaling="none")  # fmt: skip
    edit_fn = editmgt.make_edit_fn(model, settings)
    masked = jnp.full(source.shape, model.mgt.mask_token_id)
    _, _, sown = model.logits(params, masked, (hidden, text_mask, pooled), jnp.ones((2,)), source, model_state=state,
                              sown=("token_change_logit",))  # fmt: skip
    expected = 1.0 / (1.0 + np.exp(-np.asarray(sown["token_change_logit"], np.float64)))  # [2, 4, 4]
    lam = float(np.median(expected))
    out = editmgt.run_edits(edit_fn, params, state, batch, settings, region_hold_threshold=lam)
    np.testing.assert_allclose(out["attention"], expected, rtol=1e-5)
    np.testing.assert_array_equal(out["held"], expected < lam)
    np.testing.assert_array_equal(out["tokens"][out["held"]], out["source_tokens"][out["held"]])
    with pytest.raises(ValueError, match="token_change_head"):
        editmgt.make_edit_fn(_tiny_editor()[0], settings)
    with pytest.raises(ValueError, match="token_change_head"):
        editmgt.make_loss(_tiny_editor()[0], token_change_weight=1.0)


def test_text_cross_region_hold_map_is_the_gate_of_the_text_cross_attention():
    model, _, variables, batch = _tiny_editor(text_cross=True)
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    settings = editmgt.SamplingSettings(num_steps=1, attention_layers=(0, 2), attention_source="text_cross",
                                        map_scaling="none", filter="none", keep_peaks=False)  # fmt: skip
    edit_fn = editmgt.make_edit_fn(model, settings)
    plain = editmgt.run_edits(edit_fn, params, state, batch, settings, region_hold_threshold=0.0)
    # The first (only) step's forward: all target tokens masked, the source as condition.
    source = model.encode_images(state, jnp.asarray(batch["source_image"]))
    text_mask = jnp.asarray(batch["text_mask"])
    hidden, pooled = model.encode_text(params, jnp.asarray(batch["text_ids"]), text_mask)
    masked = jnp.full(source.shape, model.mgt.mask_token_id)
    _, _, sown = model.logits(params, masked, (hidden, text_mask, pooled), jnp.ones((2,)), source, model_state=state,
                              sown=("text_cross_blocks_0/text_gate",))  # fmt: skip
    gate = np.asarray(sown["text_cross_blocks_0/text_gate"]).reshape(2, 2, 2)  # [B, g, g]
    expected = np.repeat(np.repeat(gate, 2, axis=1), 2, axis=2)  # [B, h, w]
    np.testing.assert_allclose(plain["attention"], expected, rtol=1e-5)
    lam = float(np.median(expected))
    some = editmgt.run_edits(edit_fn, params, state, batch, settings, region_hold_threshold=lam)
    np.testing.assert_array_equal(some["held"], expected < lam)
    np.testing.assert_array_equal(some["tokens"][some["held"]], some["source_tokens"][some["held"]])
    # Keyword positions read only those words' share of the attention: at most the gate, and less somewhere.
    keyword = editmgt.SamplingSettings(**{**dataclasses.asdict(settings), "text_positions": "keyword"})
    partial = editmgt.run_edits(editmgt.make_edit_fn(model, keyword), params, state, batch, keyword)["attention"]
    assert np.all(partial <= expected + 1e-6) and np.any(partial < expected - 1e-3)
    with pytest.raises(ValueError, match="text_cross_attention"):
        editmgt.make_edit_fn(_tiny_editor()[0], settings)
    with pytest.raises(ValueError, match="attention_source"):
        editmgt.SamplingSettings.from_config(ml_collections.ConfigDict({"attention_source": "cross"}))


def test_gamma_changes_the_edit_only_through_the_condition(tiny_editor):
    model, _, variables, batch = tiny_editor
    settings = editmgt.SamplingSettings(num_steps=2, attention_layers=(0, 2), temperature=0.0)
    edit_fn = editmgt.make_edit_fn(model, settings)
    state = {"tokenizer": variables["tokenizer"]}
    a = editmgt.run_edits(edit_fn, variables["params"], state, batch, settings, gamma=0.0)
    other = dict(batch, source_image=batch["source_image"][::-1].copy())
    b = editmgt.run_edits(edit_fn, variables["params"], state, other, settings, gamma=0.0)
    # With gamma = 0 the source only matters through held tokens (none at lambda = 0): same output tokens.
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    c = editmgt.run_edits(edit_fn, variables["params"], state, other, settings, gamma=1.0)
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_t2i_stage_has_no_condition():
    model, objective, variables, batch = _tiny_editor("t2i")
    assert not model.uses_condition
    assert batch["text_ids"][0, :3].tolist() == [1, 2, 3]  # 'a blue circle' from target_caption
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    loss, _ = objective.loss(variables["params"], {"tokenizer": variables["tokenizer"]}, device_batch,
                             jax.random.key(0))  # fmt: skip
    assert np.isfinite(float(loss))
    # The edit stage's region hold (eval_threshold 0.3) would copy source tokens into a t2i sample; t2i holds none.
    rows, names = objective.visualize(variables["params"], {"tokenizer": variables["tokenizer"]}, batch)
    assert names[-1] == "held" and all(not np.any(row[-1]) for row in rows)


def test_sampling_settings_validation():
    import ml_collections

    config = ml_collections.ConfigDict({"num_steps": 4, "filter": "median"})
    with pytest.raises(ValueError, match="filter must be one of"):
        editmgt.SamplingSettings.from_config(config)
    settings = editmgt.SamplingSettings.from_config(ml_collections.ConfigDict({"num_steps": 4}), num_steps=7)
    assert settings.num_steps == 7 and settings.filter == "gaussian"
    with pytest.raises(ValueError, match="EditMGT has no start_time setting"):
        editmgt.SamplingSettings.from_config(ml_collections.ConfigDict({"num_steps": 4}), start_time=0.5)


def _replay_loss_forward(model, params, state, device_batch, rng, sown=()):
    """Recomputes the loss's forward by hand (cfg_dropout 0, same draws): target and source tokens `[B, L]`, the
    masked positions `[B, L]` and `model.logits`' outputs."""
    mask_rng, _ = jax.random.split(rng)
    target = model.encode_images(state, device_batch["target_image"]).reshape(2, -1)
    source = model.encode_images(state, device_batch["source_image"]).reshape(2, -1)
    inputs, masked, fraction = editmgt._mask_tokens(mask_rng, target, 16)
    hidden, pooled = model.encode_text(params, device_batch["text_ids"], device_batch["text_mask"])
    outputs = model.logits(params, inputs.reshape(2, 4, 4), (hidden, device_batch["text_mask"], pooled), fraction,
                           source.reshape(2, 4, 4), model_state=state, sown=sown)  # fmt: skip
    return target, source, masked, outputs


def _loss_setup(**editor_kwargs):
    """A tiny editor's model, params, frozen state and device batch, for the loss tests."""
    model, _, variables, batch = _tiny_editor(**editor_kwargs)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    return model, variables["params"], {"tokenizer": variables["tokenizer"]}, device_batch


def _gradient_mass(tree) -> float:
    return sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(tree))


def test_grounding_loss_is_bce_of_the_copy_score_against_unchanged_tokens():
    model, params, state, device_batch = _loss_setup(source_copy=True)
    rng = jax.random.key(5)
    plain, _ = editmgt.make_loss(model, cfg_dropout=0.0)(params, state, device_batch, rng)
    grounded_loss = editmgt.make_loss(model, cfg_dropout=0.0, grounding_weight=2.0)
    grounded, aux = grounded_loss(params, state, device_batch, rng)
    target, source, masked, (_, _, sown) = _replay_loss_forward(model, params, state, device_batch, rng,
                                                                 sown=("copy_score",))  # fmt: skip
    copy_score = sown["copy_score"]
    kept = (target == source).astype(jnp.float32)
    assert 0.0 < float(kept.mean()) < 1.0  # both labels occur
    bce = optax.sigmoid_binary_cross_entropy(copy_score.reshape(2, 16), kept)
    expected = float(jnp.sum(bce * masked) / jnp.sum(masked))
    np.testing.assert_allclose(float(aux.metrics["grounding_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(grounded) - float(plain), 2.0 * expected, rtol=1e-4)
    assert 0.0 <= float(aux.metrics["grounding_accuracy"]) <= 1.0
    grads = jax.grad(lambda p: grounded_loss(p, state, device_batch, rng)[1].metrics["grounding_loss"])(params)
    assert _gradient_mass(grads["mgt"]["copy_head"]) > 0.0
    with pytest.raises(ValueError, match="grounding_weight"):
        editmgt.make_loss(_tiny_editor()[0], grounding_weight=1.0)  # no source_copy


def _check_weighted_squared_error(setup, weight_name: str, sown_name: str, squared_error):
    """Checks an auxiliary squared-error loss (`weight_name` = 0.5) against a float64 reference: its metric is the
    `edit_weight`-weighted mean over masked tokens of `squared_error(prediction, target) -> [B, L]`, and it adds
    0.5 x that to the loss. Returns the loss function with the term on and its rng."""
    model, params, state, device_batch = setup
    rng = jax.random.key(6)
    plain, _ = editmgt.make_loss(model, cfg_dropout=0.0, edit_weight=3.0)(params, state, device_batch, rng)
    loss_fn = editmgt.make_loss(model, cfg_dropout=0.0, edit_weight=3.0, **{weight_name: 0.5})
    total, aux = loss_fn(params, state, device_batch, rng)
    target, source, masked, (_, _, sown) = _replay_loss_forward(model, params, state, device_batch, rng,
                                                                 sown=(sown_name,))  # fmt: skip
    squared = squared_error(np.asarray(sown[sown_name], np.float64), np.asarray(target))  # [B, L]
    weights = np.asarray(masked) * (1.0 + 2.0 * np.asarray(target != source))
    expected = float(np.sum(squared * weights) / np.sum(weights))
    metric = weight_name.replace("_weight", "_loss")
    np.testing.assert_allclose(float(aux.metrics[metric]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(total) - float(plain), 0.5 * expected, rtol=1e-4)
    return loss_fn, rng


def test_content_loss_is_weighted_squared_error_against_the_target_code_vectors():
    model, params, state, device_batch = setup = _loss_setup(code_content=True, content_head=True)
    codebook = np.asarray(model.code_features(state), np.float64)  # [V, F]
    standardized = (codebook - codebook.mean(0)) / (codebook.std(0) + 1e-6)

    def squared_error(predicted, target):
        return np.mean((predicted.reshape(2, 16, -1) - standardized[target]) ** 2, axis=-1)  # [B, L]

    content_loss, rng = _check_weighted_squared_error(setup, "content_weight", "content_prediction", squared_error)
    grads = jax.grad(lambda p: content_loss(p, state, device_batch, rng)[1].metrics["content_loss"])(params)
    assert _gradient_mass(grads["mgt"]["content_regressor"]) > 0.0
    assert _gradient_mass(grads["text_encoder"]) > 0.0
    with pytest.raises(ValueError, match="content_weight"):
        editmgt.make_loss(_tiny_editor(code_content=True)[0], content_weight=1.0)  # no content head
    with pytest.raises(ValueError, match="content_head needs code_content_dim"):
        _tiny_editor(content_head=True)


def test_text_gate_loss_is_bce_of_the_gates_against_changed_grid_cells():
    model, params, state, device_batch = _loss_setup(text_cross=True)
    rng = jax.random.key(7)
    plain, _ = editmgt.make_loss(model, cfg_dropout=0.0)(params, state, device_batch, rng)
    gate_loss = editmgt.make_loss(model, cfg_dropout=0.0, text_gate_weight=0.5)
    total, aux = gate_loss(params, state, device_batch, rng)
    target, source, _, (_, _, sown) = _replay_loss_forward(model, params, state, device_batch, rng,
                                                            sown=("text_cross_blocks_0/text_gate",))  # fmt: skip
    changed = np.asarray(target != source).reshape(2, 2, 2, 2, 2)  # [B, g_row, 2, g_col, 2]
    cells = changed.any(axis=(2, 4)).reshape(2, 4).astype(np.float64)  # the 2x2 grid after downsampling
    gate = np.asarray(sown["text_cross_blocks_0/text_gate"], np.float64)  # [B, 4]
    expected = float(np.mean(-(cells * np.log(gate) + (1 - cells) * np.log1p(-gate))))
    np.testing.assert_allclose(float(aux.metrics["text_gate_loss"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(total) - float(plain), 0.5 * expected, rtol=1e-4)
    grads = jax.grad(lambda p: gate_loss(p, state, device_batch, rng)[1].metrics["text_gate_loss"])(params)
    assert _gradient_mass(grads["mgt"]["text_cross_blocks_0"]["to_q"]) > 0.0
    assert _gradient_mass(grads["text_encoder"]) > 0.0
    # Rows whose text is dropped (classifier-free guidance) are left out: with every row dropped the loss is 0.
    _, dropped = editmgt.make_loss(model, cfg_dropout=1.0, text_gate_weight=0.5)(params, state, device_batch, rng)
    assert float(dropped.metrics["text_gate_loss"]) == 0.0
    with pytest.raises(ValueError, match="text_gate_weight"):
        editmgt.make_loss(_tiny_editor()[0], text_gate_weight=1.0)  # no text cross-attention


def test_text_token_gate_is_supervised_by_the_changed_tokens():
    model, params, state, device_batch = _loss_setup(token_gate=True)
    params = dict(params, mgt=dict(params["mgt"]))
    query = nn.meta.unbox(params["mgt"]["text_code_query"])["kernel"]
    params["mgt"]["text_code_query"] = {"kernel": jax.random.normal(jax.random.key(1), query.shape)}
    rng = jax.random.key(7)
    gate_loss = editmgt.make_loss(model, cfg_dropout=0.0, text_gate_weight=0.5)
    _, aux = gate_loss(params, state, device_batch, rng)
    names = ("text_cross_blocks_0/text_gate", "text_token_gate_logit")
    target, source, _, (_, _, sown) = _replay_loss_forward(model, params, state, device_batch, rng, sown=names)
    changed = np.asarray(target != source, np.float64)  # [B, L]
    logit = np.asarray(sown["text_token_gate_logit"], np.float64).reshape(2, -1)  # [B, L]
    expected = float(np.mean(np.maximum(logit, 0) - logit * changed + np.log1p(np.exp(-np.abs(logit)))))
    np.testing.assert_allclose(float(aux.metrics["text_token_gate_loss"]), expected, rtol=1e-4)
    cells = np.asarray(target != source).reshape(2, 2, 2, 2, 2).any(axis=(2, 4)).reshape(2, 4).astype(np.float64)
    gate = np.asarray(sown["text_cross_blocks_0/text_gate"], np.float64)
    coarse = float(np.mean(-(cells * np.log(gate) + (1 - cells) * np.log1p(-gate))))
    np.testing.assert_allclose(float(aux.metrics["text_gate_loss"]), coarse + expected, rtol=1e-4)
    grads = jax.grad(lambda p: gate_loss(p, state, device_batch, rng)[1].metrics["text_token_gate_loss"])(params)
    assert _gradient_mass(grads["mgt"]["text_token_gate"]) > 0.0
    _, dropped = editmgt.make_loss(model, cfg_dropout=1.0, text_gate_weight=0.5)(params, state, device_batch, rng)
    assert float(dropped.metrics["text_token_gate_loss"]) == 0.0


def test_caption_change_loss_predicts_target_minus_source_caption_word_counts():
    model, _, variables, batch = _tiny_editor(loss_options={"caption_change_weight": 0.5})
    tok = model.text_tokenizer
    change = batch["caption_change"]  # "a red circle" -> "a blue circle"; twice "a red circle" -> once
    expected_change = np.zeros_like(change)
    expected_change[0, tok.word_id("red")], expected_change[0, tok.word_id("blue")] = -1, 1
    expected_change[1, [tok.word_id("a"), tok.word_id("red"), tok.word_id("circle")]] = -1
    np.testing.assert_array_equal(change, expected_change)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    params, state = dict(variables["params"]), {"tokenizer": variables["tokenizer"]}
    head = nn.meta.unbox(params["caption_change_head"]["proj"])
    assert not np.any(np.asarray(head["kernel"]))  # a fresh head predicts no change
    rngs = jax.random.split(jax.random.key(3), 2)
    head = {
        "kernel": jax.random.normal(rngs[0], head["kernel"].shape),
        "bias": jax.random.normal(rngs[1], head["bias"].shape),
    }
    params["caption_change_head"] = {"proj": head}
    rng = jax.random.key(8)
    plain, _ = editmgt.make_loss(model, cfg_dropout=0.0)(params, state, device_batch, rng)
    change_loss = editmgt.make_loss(model, cfg_dropout=0.0, caption_change_weight=0.5)
    total, aux = change_loss(params, state, device_batch, rng)
    _, pooled = model.encode_text(params, device_batch["text_ids"], device_batch["text_mask"])
    predicted = np.asarray(pooled, np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    expected = float(np.mean(np.sum((predicted - change) ** 2, axis=-1)))
    np.testing.assert_allclose(float(aux.metrics["caption_change_loss"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(total) - float(plain), 0.5 * expected, rtol=1e-4)
    changed = change != 0
    recall = float(np.mean(np.round(predicted)[changed] == change[changed]))
    np.testing.assert_allclose(float(aux.metrics["caption_change_recall"]), recall, rtol=1e-6)
    grads = jax.grad(lambda p: change_loss(p, state, device_batch, rng)[1].metrics["caption_change_loss"])(params)
    assert _gradient_mass(grads["text_encoder"]) > 0.0 and _gradient_mass(grads["mgt"]) == 0.0
    # Rows whose text is dropped (classifier-free guidance) are left out: with every row dropped the loss is 0.
    _, dropped = editmgt.make_loss(model, cfg_dropout=1.0, caption_change_weight=0.5)(params, state, device_batch, rng)
    assert float(dropped.metrics["caption_change_loss"]) == 0.0
    with pytest.raises(ValueError, match="caption_change_weight"):
        editmgt.make_loss(_tiny_editor(stage="t2i")[0], caption_change_weight=1.0)
    without_captions = {k: v for k, v in device_batch.items() if k != "caption_change"}
    with pytest.raises(ValueError, match="source_caption"):
        change_loss(params, state, without_captions, rng)


def test_code_smoothing_trains_on_soft_targets_by_code_distance():
    model, params, state, device_batch = _loss_setup(code_content=True)
    rng = jax.random.key(4)
    plain, _ = editmgt.make_loss(model, cfg_dropout=0.0)(params, state, device_batch, rng)
    sharp, _ = editmgt.make_loss(model, cfg_dropout=0.0, code_smoothing=1e-6)(params, state, device_batch, rng)
    np.testing.assert_allclose(float(sharp), float(plain), rtol=1e-5)  # a tiny tau is the one-hot target
    smooth, _ = editmgt.make_loss(model, cfg_dropout=0.0, code_smoothing=0.5)(params, state, device_batch, rng)
    target, _, masked, (logits, _) = _replay_loss_forward(model, params, state, device_batch, rng)
    codes = np.asarray(standardize_code_features(model.code_features(state)), np.float64)  # [V, F]
    distance = np.mean((codes[:, None] - codes[None]) ** 2, axis=-1)  # [V, V]
    soft = np.exp(-distance / 0.5)
    soft /= soft.sum(axis=-1, keepdims=True)
    raw = np.asarray(logits, np.float64).reshape(2, 16, 16)
    log_probs = (
        raw - np.log(np.sum(np.exp(raw - raw.max(-1, keepdims=True)), -1, keepdims=True)) - raw.max(-1, keepdims=True)
    )
    ce = -np.sum(soft[np.asarray(target)] * log_probs, axis=-1)  # [B, L]
    masked = np.asarray(masked, np.float64)
    np.testing.assert_allclose(float(smooth), float(np.sum(ce * masked) / np.sum(masked)), rtol=1e-4)
    assert abs(float(smooth) - float(plain)) > 1e-3
    with pytest.raises(ValueError, match="code_smoothing"):
        editmgt.make_loss(_tiny_editor()[0], code_smoothing=0.1)  # no code content


def test_edit_weight_upweights_tokens_that_differ_from_the_source(tiny_editor):
    model, _, variables, batch = tiny_editor
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    rng = jax.random.key(4)
    plain, plain_aux = editmgt.make_loss(model, cfg_dropout=0.0)(params, state, device_batch, rng)
    weighted, _ = editmgt.make_loss(model, cfg_dropout=0.0, edit_weight=3.0)(params, state, device_batch, rng)
    target, source, masked, (logits, _) = _replay_loss_forward(model, params, state, device_batch, rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.reshape(2, 16, 16), target)
    weights = masked * (1.0 + 2.0 * (target != source))
    np.testing.assert_allclose(float(weighted), float(jnp.sum(ce * weights) / jnp.sum(weights)), rtol=1e-5)
    assert float(plain) != pytest.approx(float(weighted))
    assert 0.0 <= float(plain_aux.metrics["changed_accuracy"]) <= 1.0


def test_balance_changed_rows_gives_each_row_the_mean_row_weight():
    changed = np.zeros((3, 8), np.float32)
    changed[0, :2] = 1.0  # a small edit: 2 tokens
    changed[1, :] = 1.0  # a whole-image edit: 8 tokens
    balanced = np.asarray(editmgt.balance_changed_rows(jnp.asarray(changed)))
    np.testing.assert_allclose(balanced.sum(axis=1), [5.0, 5.0, 0.0])  # (2 + 8) / 2 rows with changes
    np.testing.assert_allclose(balanced[0, :2], [2.5, 2.5])
    assert balanced.sum() == pytest.approx(changed.sum())
    np.testing.assert_array_equal(balanced == 0, changed == 0)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_balance_changed_rows_partial_power_matches_numpy(power):
    changed = np.zeros((3, 8), np.float32)
    changed[0, :2] = 1.0
    changed[1, :] = 1.0
    balanced = np.asarray(editmgt.balance_changed_rows(jnp.asarray(changed), power))
    counts = np.array([2.0, 8.0])
    row_totals = counts ** (1.0 - power) * counts.sum() / (counts ** (1.0 - power)).sum()
    np.testing.assert_allclose(balanced.sum(axis=1), [*row_totals, 0.0], rtol=1e-6)
    if power == 0.0:
        np.testing.assert_allclose(balanced, changed)
    assert balanced.sum() == pytest.approx(changed.sum())


def test_changed_row_balance_reweights_changed_tokens_per_row(tiny_editor):
    model, _, variables, batch = tiny_editor
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    rng = jax.random.key(4)
    loss_fn = editmgt.make_loss(model, cfg_dropout=0.0, edit_weight=3.0, changed_row_balance=True)
    balanced, _ = loss_fn(params, state, device_batch, rng)
    target, source, masked, (logits, _) = _replay_loss_forward(model, params, state, device_batch, rng)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits.reshape(2, 16, 16), target), np.float64)
    changed = np.asarray(masked * (target != source), np.float64)  # [B, L]
    counts = changed.sum(axis=1)
    assert counts.min() != counts.max(), "the fixture's rows must change different numbers of tokens"
    row_scale = np.where(counts > 0, counts.sum() / max((counts > 0).sum(), 1) / np.maximum(counts, 1), 0.0)
    weights = np.asarray(masked, np.float64) - changed + 3.0 * changed * row_scale[:, None]
    np.testing.assert_allclose(float(balanced), (ce * weights).sum() / weights.sum(), rtol=1e-5)


@pytest.mark.parametrize("path", ["source_concat", "source_skip", "source_copy"])
def test_source_paths_are_gated_by_gamma(tiny_mgt, path):
    _, _, inputs, cond = tiny_mgt
    model = MaskedGenerativeTransformer(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                        embed_dim=8, downsample=True, axes_dims_rope=(2, 2, 4),
                                        zero_init_modulation=False, **{path: True})  # fmt: skip
    variables = model.init(jax.random.key(0), **inputs, cond_tokens=cond)
    variables = jax.tree.map(lambda x: x + 0.1, variables)  # the projection starts at zero; make it matter
    other = (cond + 5) % 16
    a = model.apply(variables, **inputs, cond_tokens=cond, gamma=0.0)
    b = model.apply(variables, **inputs, cond_tokens=other, gamma=0.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model.apply(variables, **inputs, cond_tokens=other, gamma=1.0)
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_source_skip_reaches_the_head_at_full_token_resolution(tiny_mgt):
    # adaLN-Zero init: the blocks pass image tokens through unchanged, so a condition token reaches the logits only
    # through the skip, which must act at its own grid position (not on its whole 2x2 downsampling block).
    _, _, inputs, cond = tiny_mgt
    model = MaskedGenerativeTransformer(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                        embed_dim=8, downsample=True, axes_dims_rope=(2, 2, 4), source_skip=True)  # fmt: skip
    variables = model.init(jax.random.key(0), **inputs, cond_tokens=cond)
    params = dict(variables["params"])
    params["source_skip_proj"] = jax.tree.map(lambda x: x + 0.5, params["source_skip_proj"])
    variables = {**variables, "params": params}
    other = cond.at[:, 3, 1].set((cond[:, 3, 1] + 7) % 16)
    a = model.apply(variables, **inputs, cond_tokens=cond, gamma=1.0)
    b = model.apply(variables, **inputs, cond_tokens=other, gamma=1.0)
    changed = np.abs(np.asarray(a - b)).sum(-1) > 1e-6  # [B, h, w]
    expected = np.zeros_like(changed)
    expected[:, 3, 1] = True
    np.testing.assert_array_equal(changed, expected)
    without_skip = model.apply(variables, **inputs, cond_tokens=other, gamma=0.0)  # gated off with gamma
    np.testing.assert_array_equal(np.asarray(without_skip), np.asarray(model.apply(variables, **inputs, gamma=0.0,
                                                                                  cond_tokens=cond)))  # fmt: skip


def test_source_copy_score_points_at_the_source_token(tiny_mgt):
    _, _, inputs, cond = tiny_mgt
    model = MaskedGenerativeTransformer(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                        embed_dim=8, downsample=True, axes_dims_rope=(2, 2, 4), source_copy=True)  # fmt: skip
    variables = nn.meta.unbox(model.init(jax.random.key(0), **inputs, cond_tokens=cond))
    base = model.apply(variables, **inputs, cond_tokens=cond, gamma=0.0)  # copy path off
    params = dict(variables["params"])
    params["copy_head"] = {**params["copy_head"], "bias": params["copy_head"]["bias"] + 3.0}
    raised = model.apply({**variables, "params": params}, **inputs, cond_tokens=cond, gamma=1.0)
    delta = np.asarray(raised - base)  # [B, h, w, V]: only the source token's logit moves
    is_source = np.asarray(jax.nn.one_hot(cond, 16, dtype=bool))
    copy_score = np.asarray(model.apply(variables, **inputs, cond_tokens=cond, gamma=1.0) - base)[is_source] + 3.0
    np.testing.assert_allclose(delta[is_source], copy_score, atol=1e-5)
    np.testing.assert_allclose(delta[~is_source], 0.0, atol=1e-5)


def test_t2i_captions_fit_the_text_length():
    from editing_jax.data.world import edits
    from editing_jax.methods.editmgt_configs import editmgt_config
    from editing_jax.text.tokenizer import split_words

    longest = max(len(split_words(edits.generate_edit("train", 0, i).target.caption())) for i in range(400))
    assert longest <= editmgt_config("size=32", stage="t2i").text.max_length
    assert longest > editmgt_config("size=32", stage="edit").text.max_length  # instructions need fewer words


def test_replace_params_takes_a_prefix_of_longer_position_tables_only():
    fresh = {"text_encoder": {"position_embedding": jnp.zeros((3, 2)), "proj": jnp.zeros((3, 2))}}
    long_table = jnp.arange(10.0).reshape(5, 2)
    loaded = editmgt.replace_params(fresh, {"text_encoder": {"position_embedding": long_table}})
    np.testing.assert_array_equal(loaded["text_encoder"]["position_embedding"], long_table[:3])
    np.testing.assert_array_equal(loaded["text_encoder"]["proj"], 0.0)  # absent from the loaded tree: kept
    with pytest.raises(ValueError, match="proj"):
        editmgt.replace_params(fresh, {"text_encoder": {"proj": long_table}})
    with pytest.raises(ValueError, match="position_embedding"):  # a shorter table cannot fill a longer one
        editmgt.replace_params({"position_embedding": jnp.zeros((5, 2))}, {"position_embedding": jnp.zeros((3, 2))})


def test_replace_params_fills_partitioned_boxes_from_init():
    boxed = nn.with_logical_partitioning(lambda *_: jnp.zeros((2, 3)), ("embed", None))(None)
    fresh = {"mgt": {"proj": {"kernel": boxed, "bias": jnp.zeros(3)}, "new": {"kernel": boxed}}}
    loaded = editmgt.replace_params(fresh, {"mgt": {"proj": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}})
    kernel = loaded["mgt"]["proj"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == ("embed", None)
    np.testing.assert_array_equal(kernel.unbox(), 1.0)
    np.testing.assert_array_equal(loaded["mgt"]["proj"]["bias"], 1.0)
    np.testing.assert_array_equal(loaded["mgt"]["new"]["kernel"].unbox(), 0.0)  # not in the loaded tree: kept
    with pytest.raises(ValueError, match="proj"):
        editmgt.replace_params(fresh, {"mgt": {"proj": {"kernel": jnp.ones((3, 3))}}})


def test_build_model_adds_the_content_head_only_with_its_loss():
    vq_config = config_lib.load_config("configs/tokenizer/vq.py:size=32,patch")
    config = config_lib.load_config("configs/editmgt/edit.py:size=32,tiny")
    config.tokenizer.model_json = json.dumps(vq_config.model.to_dict())
    config.text.vocab = "make the red circle blue"
    assert not editmgt.build_model(config).mgt.content_head
    config.loss.content_weight = 1.0
    assert editmgt.build_model(config).mgt.content_head


def test_pixel_head_blocks_are_the_patch_vq_pixels():
    """The head reads a code vector as `[C, N]` channel-major: pixel n of code k is the decoded block's pixel n."""
    vq = VQModel(encoder_type="patch", decoder_type="patch", patch_size=2, codebook_size=16, code_dim=12)
    variables = vq.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    codes = np.asarray(vq.apply(variables, method=VQModel.code_vectors))  # [V, 12]
    blocks = np.asarray(vq.apply(variables, jnp.arange(16).reshape(16, 1, 1), method=VQModel.decode_indices))
    np.testing.assert_allclose(codes.reshape(16, 3, 4).transpose(0, 2, 1), blocks.reshape(16, 4, 3), rtol=1e-6)


def test_pixel_head_scores_codes_by_squared_distance_to_the_gated_source_pixels():
    model = MaskedGenerativeTransformer(codebook_size=16, embed_dim=8, code_content_dim=12, pixel_channels=3)
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(2, 3, 3, 8)), jnp.float32)
    codes = jnp.asarray(rng.uniform(-1, 1, (16, 12)), jnp.float32)
    source = jnp.asarray(rng.integers(0, 16, (2, 3, 3)), jnp.int32)
    method = MaskedGenerativeTransformer._pixel_logits
    variables = model.init(jax.random.key(0), hidden, codes, source, method=method)
    variables = {"params": {**variables["params"], "pixel_log_scale": jnp.log(3.0)}}  # a learned scale of 3
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(variables["params"]))
    logits, prediction = model.apply(variables, hidden, codes, source, method=method)

    code_pixels = np.asarray(codes, np.float64).reshape(16, 3, 4).transpose(0, 2, 1)  # [V, N, C]
    src = code_pixels[np.asarray(source)]  # [B, h, w, N, C]
    h = np.asarray(hidden, np.float64) @ params["pixel_from_hidden"]["kernel"] + params["pixel_from_hidden"]["bias"]
    features = h[..., None, :] + src @ params["pixel_from_source"]["kernel"] + params["pixel_position"]
    gelu = 0.5 * features * (1 + np.tanh(np.sqrt(2 / np.pi) * (features + 0.044715 * features**3)))
    out = gelu @ params["pixel_out"]["kernel"] + params["pixel_out"]["bias"]  # [B, h, w, N, 4]
    gate = 1 / (1 + np.exp(-(out[..., 3:] - 2.0)))
    expected = gate * out[..., :3] + (1 - gate) * src
    np.testing.assert_allclose(np.asarray(prediction), expected, rtol=1e-4, atol=1e-5)
    distance = np.sum((expected[..., None, :, :] - code_pixels) ** 2, axis=(-2, -1))  # [B, h, w, V]
    np.testing.assert_allclose(np.asarray(logits), -3.0 * distance, rtol=1e-4, atol=1e-3)
    # The nearest code wins: the argmax is the code closest to the predicted pixels.
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1), distance.argmin(-1))
    with pytest.raises(ValueError, match="pixel_channels"):
        bad = MaskedGenerativeTransformer(codebook_size=16, embed_dim=8, code_content_dim=10, pixel_channels=3)
        bad.init(jax.random.key(0), hidden, codes[:, :10], source, method=method)


def test_pixel_head_trains_and_edits_and_gamma_zero_removes_the_source_pixels():
    model, objective, variables, batch = _tiny_editor(pixel_head=True)
    assert "pixel_out" in variables["params"]["mgt"]
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    grads = jax.grad(lambda p: objective.loss(p, state, device_batch, jax.random.key(3))[0])(params)
    for name in ("pixel_out", "pixel_from_source", "pixel_log_scale"):
        assert np.abs(np.asarray(jax.tree.leaves(grads["mgt"][name])[0])).max() > 0, name
    mask = jnp.asarray(batch["text_mask"])
    hidden, pooled = model.encode_text(params, jnp.asarray(batch["text_ids"]), mask)
    tokens = jnp.full((2, 4, 4), model.mgt.mask_token_id, jnp.int32)
    source = model.encode_images(state, jnp.asarray(batch["source_image"]))
    text = (hidden, mask, pooled)
    logits, _, sown = model.logits(params, tokens, text, jnp.ones((2,)), source, model_state=state,
                                   sown=("pixel_prediction",))  # fmt: skip
    assert sown["pixel_prediction"].shape == (2, 4, 4, 4, 3)
    zero = [model.logits(params, tokens, text, jnp.ones((2,)), s, gamma=0.0, model_state=state)[0]
            for s in (source, (source + 5) % 16)]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(zero[0]), np.asarray(zero[1]))
    settings = editmgt.SamplingSettings(num_steps=2, attention_layers=(0, 2))
    out = editmgt.run_edits(editmgt.make_edit_fn(model, settings), params, state, batch, settings)
    assert out["images"].shape == (2, 8, 8, 3)


def test_pixel_loss_is_weighted_squared_error_against_the_target_code_pixels():
    model, _, state, _ = setup = _loss_setup(pixel_head=True)
    blocks = np.asarray(model.code_features(state), np.float64).reshape(16, 3, 4).transpose(0, 2, 1)  # [V, N, C]

    def squared_error(predicted, target):
        return np.mean((predicted.reshape(2, 16, 4, 3) - blocks[target]) ** 2, axis=(-2, -1))  # [B, L]

    _check_weighted_squared_error(setup, "pixel_weight", "pixel_prediction", squared_error)
    with pytest.raises(ValueError, match="pixel_weight"):
        editmgt.make_loss(_tiny_editor(code_content=True)[0], pixel_weight=1.0)  # no pixel head


def test_build_model_pixel_head_needs_a_patch_vq():
    config = config_lib.load_config("configs/editmgt/edit.py:size=32,tiny")
    config.text.vocab = "make the red circle blue"
    config.model.pixel_head = True
    config.tokenizer.model_json = json.dumps(
        config_lib.load_config("configs/tokenizer/vq.py:size=32,patch").model.to_dict()
    )
    assert editmgt.build_model(config).mgt.pixel_channels == 3
    config.tokenizer.model_json = json.dumps(config_lib.load_config("configs/tokenizer/vq.py:size=32").model.to_dict())
    with pytest.raises(ValueError, match="patch VQ"):
        editmgt.build_model(config)


def test_fused_code_head_adds_the_content_keys_to_the_mlm_kernel(tiny_mgt):
    base, _, inputs, cond = tiny_mgt
    fused = dataclasses.replace(base, code_content_dim=4, fused_code_head=True)
    codes = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4)), jnp.float32)
    variables = nn.meta.unbox(fused.init(jax.random.key(1), **inputs, cond_tokens=cond, code_features=codes))
    assert "content_query" not in variables["params"]  # one [E, V] product instead of two
    logits, captured = fused.apply(variables, **inputs, cond_tokens=cond, code_features=codes,
                                   capture_intermediates=lambda m, _: m.name == "layer_norm")  # fmt: skip
    features = np.asarray(captured["intermediates"]["mlm_layer"]["layer_norm"]["__call__"][0], np.float64)
    keys = np.asarray(fused.apply(variables, codes, method=lambda m, c: m.content_key_out(nn.gelu(
        m.content_key_in(m._standardized_codes(c))))), np.float64)  # [V, E]  # fmt: skip
    # The unfused model with a zero content query has the same logits but for the content term.
    unfused = dataclasses.replace(fused, fused_code_head=False)
    zero_query = {"kernel": jnp.zeros((base.width, base.embed_dim), jnp.float32)}
    unfused_variables = {"params": dict(variables["params"], content_query=zero_query)}
    expected = np.asarray(unfused.apply(unfused_variables, **inputs, cond_tokens=cond, code_features=codes), np.float64)
    expected = expected + features @ keys.T / np.sqrt(base.embed_dim)  # [B, h, w, V]
    assert np.abs(features @ keys.T).max() > 0.1  # the content term is not negligible
    np.testing.assert_allclose(np.asarray(logits, np.float64), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fused_code_head needs code content"):
        dataclasses.replace(base, fused_code_head=True).init(jax.random.key(1), **inputs, cond_tokens=cond)


def test_text_code_score_adds_the_gated_text_score_of_every_code(tiny_mgt):
    base, _, inputs, cond = tiny_mgt
    model = dataclasses.replace(base, text_cross_attention=True, code_content_dim=4, text_code_score=True)
    codes = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4)), jnp.float32)
    variables = nn.meta.unbox(model.init(jax.random.key(1), **inputs, cond_tokens=cond, code_features=codes))
    assert not np.any(np.asarray(variables["params"]["text_code_query"]["kernel"]))  # a fresh score adds nothing
    plain = dataclasses.replace(model, text_code_score=False)
    without = {"params": {k: v for k, v in variables["params"].items() if k != "text_code_query"}}
    np.testing.assert_array_equal(
        np.asarray(model.apply(variables, **inputs, cond_tokens=cond, code_features=codes)),
        np.asarray(plain.apply(without, **inputs, cond_tokens=cond, code_features=codes)),
    )
    query_kernel = jax.random.normal(jax.random.key(2), variables["params"]["text_code_query"]["kernel"].shape)
    variables["params"]["text_code_query"] = {"kernel": query_kernel}
    logits, sown = model.apply(variables, **inputs, cond_tokens=cond, code_features=codes, mutable=["intermediates"])
    gate = np.asarray(sown["intermediates"]["text_cross_blocks_0"]["text_gate"][0], np.float64).reshape(2, 2, 2)
    fine_gate = gate.repeat(2, axis=1).repeat(2, axis=2)  # [B, 4, 4]: the 2x2 grid upsampled
    keys = np.asarray(model.apply(variables, codes, method=lambda m, c: m.content_key_out(nn.gelu(
        m.content_key_in(m._standardized_codes(c))))), np.float64)  # [V, E]  # fmt: skip
    query = np.asarray(inputs["pooled_text"], np.float64) @ np.asarray(query_kernel, np.float64)  # [B, E]
    score = query @ keys.T / np.sqrt(model.embed_dim)  # [B, V]
    expected = np.asarray(plain.apply(without, **inputs, cond_tokens=cond, code_features=codes), np.float64)
    expected = expected + fine_gate[..., None] * score[:, None, None, :]
    np.testing.assert_allclose(np.asarray(logits, np.float64), expected, rtol=1e-4, atol=1e-5)
    gated = dataclasses.replace(model, text_code_token_gate=True)
    gate_params = nn.meta.unbox(gated.init(jax.random.key(1), **inputs, cond_tokens=cond, code_features=codes))
    gate_params["params"] = dict(variables["params"], text_token_gate=gate_params["params"]["text_token_gate"])
    logits, sown = gated.apply(gate_params, **inputs, cond_tokens=cond, code_features=codes, mutable=["intermediates"])
    token_gate = 1.0 / (1.0 + np.exp(-np.asarray(sown["intermediates"]["text_token_gate_logit"][0], np.float64)))
    expected = np.asarray(plain.apply(without, **inputs, cond_tokens=cond, code_features=codes), np.float64)
    expected = expected + (fine_gate * token_gate)[..., None] * score[:, None, None, :]
    np.testing.assert_allclose(np.asarray(logits, np.float64), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="text_code_token_gate needs text_code_score"):
        dataclasses.replace(model, text_code_score=False, text_code_token_gate=True).init(
            jax.random.key(1), **inputs, cond_tokens=cond, code_features=codes
        )
    with pytest.raises(ValueError, match="text_code_score needs"):
        dataclasses.replace(base, code_content_dim=4, text_code_score=True).init(
            jax.random.key(1), **inputs, cond_tokens=cond, code_features=codes
        )


def test_logits_return_a_submodule_value_by_path():
    model, _, variables, batch = _tiny_editor(text_cross=True)
    params, state = variables["params"], {"tokenizer": variables["tokenizer"]}
    mask = jnp.asarray(batch["text_mask"])
    hidden, pooled = model.encode_text(params, jnp.asarray(batch["text_ids"]), mask)
    text = (hidden, mask, pooled)
    tokens = jnp.full((2, 4, 4), model.mgt.mask_token_id, jnp.int32)
    source = model.encode_images(state, jnp.asarray(batch["source_image"]))
    _, _, sown = model.logits(params, tokens, text, jnp.ones((2,)), source, model_state=state,
                              sown=("text_cross_blocks_0/text_gate",))  # fmt: skip
    gate = np.asarray(sown["text_cross_blocks_0/text_gate"])
    assert gate.shape == (2, 4) and np.all((gate > 0) & (gate < 1))  # [B, g]: the 4x4 grid downsampled to 2x2
    with pytest.raises(ValueError, match="text_cross_attention"):
        model.logits(params, tokens, text, jnp.ones((2,)), source, model_state=state,
                     sown=("text_cross_blocks_1/text_gate",))  # fmt: skip


@pytest.mark.parametrize("stage", ["t2i", "edit"])
@pytest.mark.parametrize("arg", ["size=32", "size=64", "size=32,quick", "size=32,tiny"])
def test_every_editmgt_variant_maps_attention_layers_inside_its_blocks(stage, arg):
    config = config_lib.load_config(f"configs/editmgt/{stage}.py:{arg}")
    num_blocks = config.model.num_layers + config.model.num_single_layers
    start, stop = config.sampling.attention_layers
    assert 0 <= start < stop <= num_blocks
    assert sum(config.model.axes_dims_rope) == config.model.head_dim
    if arg == "size=32,quick":  # The quickstart's smaller model (docs/RESULTS.md, "A smaller model, more steps").
        assert (config.model.num_layers, config.model.num_single_layers, config.model.num_heads) == (1, 1, 2)


def test_the_long_variant_is_the_measured_grounded_quick_recipe():
    long = config_lib.load_config("configs/editmgt/edit.py:size=32,long").to_dict()
    quick = config_lib.load_config("configs/editmgt/edit.py:size=32,quick").to_dict()
    quick["model"].update(text_cross_source=True, text_code_score=True, num_layers=2, num_single_layers=2)
    quick["text"]["gate_encoder"] = True
    quick["sampling"]["attention_layers"] = (0, 4)
    quick["train"]["num_steps"] = 48000
    assert long == quick  # The run `l48k_deep_s1` of docs/RESULTS.md, "Two hours on the Zen 4".
    for bad in ("configs/editmgt/t2i.py:size=32,long", "configs/editmgt/edit.py:size=32,long,tiny"):
        with pytest.raises(config_lib.ConfigError, match="long"):
            config_lib.load_config(bad)


def test_a_frozen_text_encoder_gets_no_gradient_and_the_loss_is_unchanged():
    model, params, state, device_batch = _loss_setup(text_cross=True)
    rng = jax.random.key(3)
    trained, frozen = (editmgt.make_loss(model, cfg_dropout=0.0, train_text_encoder=flag) for flag in (True, False))
    np.testing.assert_allclose(float(frozen(params, state, device_batch, rng)[0]),
                               float(trained(params, state, device_batch, rng)[0]), rtol=1e-6)  # fmt: skip
    grads = {flag: jax.grad(lambda p, f=loss: f(p, state, device_batch, rng)[0])(params)
             for flag, loss in ((True, trained), (False, frozen))}  # fmt: skip
    assert _gradient_mass(grads[True]["text_encoder"]) > 0.0
    assert _gradient_mass(grads[False]["text_encoder"]) == 0.0
    assert _gradient_mass(grads[False]["mgt"]) > 0.0


def test_the_gate_text_encoder_is_frozen_and_only_the_text_cross_attention_reads_it():
    model, params, state, device_batch = _loss_setup(text_cross=True, gate_encoder=True)
    rng = jax.random.key(3)
    hidden, _ = model.encode_text(params, device_batch["text_ids"], device_batch["text_mask"])
    assert hidden.shape[-1] == 2 * model.text_encoder.width
    loss = editmgt.make_loss(model, cfg_dropout=0.0, text_gate_weight=1.0)  # at init only the gate loss reaches it
    grads = jax.grad(lambda p: loss(p, state, device_batch, rng)[0])(params)
    assert _gradient_mass(grads["gate_text_encoder"]) == 0.0
    assert _gradient_mass(grads["text_encoder"]) > 0.0
    assert _gradient_mass(grads["mgt"]["gate_context_embedder"]) > 0.0

    def text_gate(p):
        return _replay_loss_forward(model, p, state, device_batch, rng, sown=("text_cross_blocks_0/text_gate",))[3][2]

    gate = text_gate(params)["text_cross_blocks_0/text_gate"]  # [B, g]
    moved = dict(params, gate_text_encoder=jax.tree.map(lambda x: x * 1.5 + 0.1, params["gate_text_encoder"]))
    assert float(jnp.abs(text_gate(moved)["text_cross_blocks_0/text_gate"] - gate).max()) > 1e-4
