"""TextCrossAttention: image tokens read the text through their own softmax over [null; text]."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editing_jax.models.flow_dit import FlowDiT, latent_image_ids
from editing_jax.models.mgt import MaskedGenerativeTransformer
from editing_jax.nn.transformer import TextCrossAttention

HEADS, HEAD_DIM, WIDTH = 2, 4, 8


def _inputs(seed=0, batch=2, image_len=5, text_len=6):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, image_len, WIDTH)).astype(np.float32)
    context = rng.normal(size=(batch, text_len, WIDTH)).astype(np.float32)
    mask = np.ones((batch, text_len), bool)
    mask[1, 4:] = False  # the second row has two padded positions
    pooled = rng.normal(size=(batch, 3)).astype(np.float32)
    return hidden, context, mask, pooled


def _randomized_params(module, inputs, seed=1):
    """Init, then replace every leaf (the zero `to_out` and `null_key` included) with random values."""
    params = module.init(jax.random.key(0), *inputs)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(nn.meta.unbox(params))
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(scale=0.5, size=leaf.shape).astype(np.float32) for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _reference(params, hidden, context, mask, pooled):
    """float64 NumPy version of the documented formula."""

    def layer_norm(x):
        x = x.astype(np.float64)
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale

    p = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), params)
    batch, length, _ = hidden.shape
    query = rms((layer_norm(hidden) @ p["to_q"]["kernel"]).reshape(batch, length, HEADS, HEAD_DIM),
                p["norm_q"]["scale"])  # fmt: skip
    text = layer_norm(context)
    key = rms((text @ p["to_k"]["kernel"]).reshape(batch, -1, HEADS, HEAD_DIM), p["norm_k"]["scale"])
    value = text @ p["to_v"]["kernel"] + p["to_v"]["bias"] + (pooled @ p["pooled_to_v"]["kernel"])[:, None]
    value = value.reshape(batch, -1, HEADS, HEAD_DIM)
    logits = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(HEAD_DIM)
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    null = np.einsum("bqhd,hd->bhq", query, p["null_key"])[..., None] / np.sqrt(HEAD_DIM)
    full = np.concatenate([null, logits], -1)
    probs = np.exp(full - full.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs[..., 1:], value).reshape(batch, length, -1)
    return out @ p["to_out"]["kernel"] + p["to_out"]["bias"], 1.0 - probs[..., 0].mean(1)


def test_matches_a_float64_reference_with_null_gate():
    module = TextCrossAttention(HEADS, HEAD_DIM)
    inputs = _inputs()
    params = _randomized_params(module, inputs)
    (out, gate), state = module.apply({"params": params}, *inputs, mutable=["intermediates"])
    expected, expected_gate = _reference(params, *inputs)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state["intermediates"]["text_gate"][0]), expected_gate, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gate), expected_gate, atol=1e-6)


def test_padded_text_is_ignored_and_the_gate_counts_real_words():
    module = TextCrossAttention(HEADS, HEAD_DIM)
    hidden, context, mask, pooled = _inputs()
    params = _randomized_params(module, (hidden, context, mask, pooled))
    out, _ = module.apply({"params": params}, hidden, context, mask, pooled)
    changed = context.copy()
    changed[1, 4:] += 100.0  # only padded positions of row 1
    out_changed, _ = module.apply({"params": params}, hidden, changed, mask, pooled)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(out_changed[1]))
    changed[0] = -changed[0]  # real words of row 0 (the layer norm ignores a shift, not a sign flip)
    out_changed, _ = module.apply({"params": params}, hidden, changed, mask, pooled)
    assert not np.allclose(np.asarray(out[0]), np.asarray(out_changed[0]))

    # With every logit 0 the gate is the share of real words among [null; words].
    params["norm_k"]["scale"] = np.zeros(HEAD_DIM, np.float32)
    params["null_key"] = np.zeros((HEADS, HEAD_DIM), np.float32)
    _, state = module.apply({"params": params}, hidden, context, mask, pooled, mutable=["intermediates"])
    gate = np.asarray(state["intermediates"]["text_gate"][0])  # all logits 0: 1 - 1/(1 + L_real)
    np.testing.assert_allclose(gate[0], 6 / 7, atol=1e-6)
    np.testing.assert_allclose(gate[1], 4 / 5, atol=1e-6)


def test_positions_let_identical_tokens_read_the_text_differently():
    from editing_jax.nn.attention import grid_position_ids

    module = TextCrossAttention(HEADS, HEAD_DIM)
    _, context, mask, pooled = _inputs()
    same = np.broadcast_to(np.random.default_rng(3).normal(size=(1, 1, WIDTH)), (2, 4, WIDTH)).astype(np.float32)
    positions = grid_position_ids(2, 2)  # [4, 3]
    params = _randomized_params(module, (same, context, mask, pooled, positions))
    assert "position_proj" in params
    out = np.asarray(module.apply({"params": params}, same, context, mask, pooled, positions)[0])
    assert np.abs(out[:, 1:] - out[:, :1]).max() > 1e-3  # the four grid cells differ
    no_positions = {name: value for name, value in params.items() if name != "position_proj"}
    out = np.asarray(module.apply({"params": no_positions}, same, context, mask, pooled)[0])
    np.testing.assert_allclose(out[:, 1:], np.broadcast_to(out[:, :1], out[:, 1:].shape), atol=1e-6)
    with pytest.raises(ValueError, match="text_cross_positions and text_gate_copy need"):
        MaskedGenerativeTransformer(codebook_size=4, text_cross_positions=True).init(
            jax.random.key(0), *_mgt_inputs()[0]
        )
    with pytest.raises(ValueError, match="needs num_layers >= 1"):
        MaskedGenerativeTransformer(codebook_size=4, num_layers=0, text_cross_attention=True).init(
            jax.random.key(0), *_mgt_inputs()[0]
        )


@pytest.fixture(scope="module")
def mgt_pair():
    kwargs = dict(codebook_size=16, num_layers=2, num_single_layers=1, num_heads=2, head_dim=8, embed_dim=8,
                  axes_dims_rope=(2, 2, 4))  # fmt: skip
    return MaskedGenerativeTransformer(**kwargs), MaskedGenerativeTransformer(text_cross_attention=True, **kwargs)


def _mgt_inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 17, size=(2, 4, 4)), jnp.int32)
    cond = jnp.asarray(rng.integers(0, 16, size=(2, 4, 4)), jnp.int32)
    text = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    mask = jnp.ones((2, 5), bool)
    pooled = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    return (tokens, text, mask, pooled, jnp.full((2,), 0.5), jnp.zeros((2, 5))), cond


def test_a_fresh_cross_attention_leaves_the_mgt_unchanged_and_then_reads_the_text(mgt_pair):
    plain, crossed = mgt_pair
    args, cond = _mgt_inputs()
    params = crossed.init(jax.random.key(0), *args, cond_tokens=cond)["params"]
    assert {f"text_cross_blocks_{i}" for i in range(2)} <= set(params)
    without = {name: value for name, value in params.items() if not name.startswith("text_cross_blocks")}
    assert set(plain.init(jax.random.key(0), *args, cond_tokens=cond)["params"]) == set(without)
    np.testing.assert_array_equal(
        np.asarray(crossed.apply({"params": params}, *args, cond_tokens=cond)),
        np.asarray(plain.apply({"params": without}, *args, cond_tokens=cond)),
    )
    # With a trained (non-zero) output projection the text reaches the logits through the new path.
    params = nn.meta.unbox(params)
    params["text_cross_blocks_1"]["to_out"]["kernel"] = jnp.ones_like(params["text_cross_blocks_1"]["to_out"]["kernel"])
    other_text = (args[0], args[1] + 1.0, *args[2:])
    changed = crossed.apply({"params": params}, *other_text, cond_tokens=cond) - crossed.apply(
        {"params": params}, *args, cond_tokens=cond
    )
    without = {name: value for name, value in params.items() if not name.startswith("text_cross_blocks")}
    changed_plain = plain.apply({"params": without}, *other_text, cond_tokens=cond) - plain.apply(
        {"params": without}, *args, cond_tokens=cond
    )
    assert float(jnp.abs(changed - changed_plain).max()) > 1e-3


def test_flow_dit_cross_attention_starts_as_the_plain_model_and_covers_reference_tokens():
    kwargs = dict(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                  zero_init_output=False, zero_init_modulation=False)  # fmt: skip
    plain, crossed = FlowDiT(**kwargs), FlowDiT(text_cross_attention=True, **kwargs)
    rng = np.random.default_rng(0)
    x, ref = (jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32) for _ in range(2))
    text, pooled = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32), jnp.asarray(rng.normal(size=(2, 5)))
    args = (x, text, pooled, jnp.full((2,), 0.5), latent_image_ids(2, 2), np.zeros((3, 3), np.float32))
    ref_kwargs = dict(ref_hidden=ref, ref_ids=latent_image_ids(2, 2, index=1))
    params = nn.meta.unbox(crossed.init(jax.random.key(0), *args, **ref_kwargs)["params"])
    without = {name: value for name, value in params.items() if name != "text_cross_blocks_0"}
    np.testing.assert_array_equal(
        np.asarray(crossed.apply({"params": params}, *args, **ref_kwargs)),
        np.asarray(plain.apply({"params": without}, *args, **ref_kwargs)),
    )
    _, state = crossed.apply({"params": params}, *args, **ref_kwargs, mutable=["intermediates"])
    assert state["intermediates"]["text_cross_blocks_0"]["text_gate"][0].shape == (2, 8)  # target + reference


def test_text_gate_copy_scales_the_copy_score_by_one_minus_the_gate():
    kwargs = dict(codebook_size=16, num_layers=2, num_single_layers=1, num_heads=2, head_dim=8, embed_dim=8,
                  axes_dims_rope=(2, 2, 4), source_copy=True, text_cross_attention=True, downsample=True)  # fmt: skip
    plain, gated = MaskedGenerativeTransformer(**kwargs), MaskedGenerativeTransformer(text_gate_copy=True, **kwargs)
    args, cond = _mgt_inputs()
    params = nn.meta.unbox(plain.init(jax.random.key(0), *args, cond_tokens=cond)["params"])
    for block in ("text_cross_blocks_0", "text_cross_blocks_1"):  # a trained-looking gate and output
        params[block]["to_out"]["kernel"] = jnp.full_like(params[block]["to_out"]["kernel"], 0.1)
    params["copy_head"]["bias"] = jnp.full_like(params["copy_head"]["bias"], 3.0)

    def sown(model, text_mask):
        call_args = (*args[:2], text_mask, *args[3:])
        _, state = model.apply({"params": params}, *call_args, cond_tokens=cond, mutable=["intermediates"])
        state = state["intermediates"]
        return np.asarray(state["copy_score"][0]), np.asarray(state["text_cross_blocks_1"]["text_gate"][0])

    copy_plain, gate = sown(plain, args[2])
    copy_gated, _ = sown(gated, args[2])
    keep = np.repeat(np.repeat((1.0 - gate).reshape(2, 2, 2), 2, axis=1), 2, axis=2)  # [B, h, w]
    assert 0.05 < gate.min() and gate.max() < 0.999
    np.testing.assert_allclose(copy_gated, keep * copy_plain, rtol=1e-5, atol=1e-6)
    # Without text the gate is exactly 0 and nothing changes.
    no_text = jnp.zeros_like(args[2])
    np.testing.assert_array_equal(sown(gated, no_text)[0], sown(plain, no_text)[0])


def test_absolute_positions_start_neutral_learn_from_zero_and_then_place_tokens():
    kwargs = dict(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, embed_dim=8,
                  axes_dims_rope=(2, 2, 4), downsample=True)  # fmt: skip
    plain = MaskedGenerativeTransformer(**kwargs)
    placed = MaskedGenerativeTransformer(absolute_positions=True, **kwargs)
    args, cond = _mgt_inputs()
    params = nn.meta.unbox(placed.init(jax.random.key(0), *args, cond_tokens=cond)["params"])
    without = {name: value for name, value in params.items() if name != "position_embed"}
    assert set(nn.meta.unbox(plain.init(jax.random.key(0), *args, cond_tokens=cond)["params"])) == set(without)
    np.testing.assert_array_equal(
        np.asarray(placed.apply({"params": params}, *args, cond_tokens=cond)),
        np.asarray(plain.apply({"params": without}, *args, cond_tokens=cond)),
    )

    def loss(kernel):
        tree = {**params, "position_embed": {"kernel": kernel}}
        return jnp.sum(placed.apply({"params": tree}, *args, cond_tokens=cond) ** 2)

    kernel = params["position_embed"]["kernel"]
    assert float(jnp.abs(jax.grad(loss)(kernel)).max()) > 0  # a zero start still gets a gradient
    # A uniform source and target: with a trained position projection the logits at two grid cells differ more.
    uniform = jnp.full_like(args[0], 3)
    uniform_args = (uniform, *args[1:])
    trained = {**params, "position_embed": {"kernel": jax.random.normal(jax.random.key(1), kernel.shape)}}

    def spread(tree):
        logits = placed.apply({"params": tree}, *uniform_args, cond_tokens=uniform)  # [B, h, w, V]
        return float(jnp.abs(logits - logits[:, :1, :1]).max())

    assert spread(trained) > spread(params) + 1e-3


def test_text_cross_single_adds_a_gate_after_every_block_and_starts_as_the_double_only_model():
    kwargs = dict(codebook_size=16, num_layers=1, num_single_layers=2, num_heads=2, head_dim=8, embed_dim=8,
                  axes_dims_rope=(2, 2, 4), text_cross_attention=True)  # fmt: skip
    double_only = MaskedGenerativeTransformer(**kwargs)
    every = MaskedGenerativeTransformer(text_cross_single=True, **kwargs)
    assert (double_only.num_text_cross_blocks, every.num_text_cross_blocks) == (1, 3)
    args, cond = _mgt_inputs()
    params = nn.meta.unbox(every.init(jax.random.key(0), *args, cond_tokens=cond)["params"])
    assert {f"text_cross_blocks_{i}" for i in range(3)} <= set(params)
    fewer = {
        name: value for name, value in params.items() if name not in ("text_cross_blocks_1", "text_cross_blocks_2")
    }
    np.testing.assert_array_equal(  # fresh cross-attention outputs are zero
        np.asarray(every.apply({"params": params}, *args, cond_tokens=cond)),
        np.asarray(double_only.apply({"params": fewer}, *args, cond_tokens=cond)),
    )
    # The last single block's gate is sown and its update reaches the logits once trained.
    _, state = every.apply({"params": params}, *args, cond_tokens=cond, mutable=["intermediates"])
    assert state["intermediates"]["text_cross_blocks_2"]["text_gate"][0].shape == (2, 16)  # 4 x 4 tokens
    params["text_cross_blocks_2"]["to_out"]["kernel"] = jnp.ones_like(params["text_cross_blocks_2"]["to_out"]["kernel"])
    other_text = (args[0], args[1] + 1.0, *args[2:])
    before = every.apply({"params": params}, *args, cond_tokens=cond)
    assert float(jnp.abs(every.apply({"params": params}, *other_text, cond_tokens=cond) - before).max()) > 1e-3
    with pytest.raises(ValueError, match="text_cross_single and text_cross_source need"):
        MaskedGenerativeTransformer(codebook_size=4, text_cross_single=True).init(jax.random.key(0), *args)


def test_text_cross_source_reads_the_text_from_the_condition_tokens_and_gamma_zero_drops_them():
    kwargs = dict(codebook_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, embed_dim=8,
                  axes_dims_rope=(2, 2, 4), text_cross_attention=True, zero_init_modulation=False)  # fmt: skip
    target_read, source_read = (
        MaskedGenerativeTransformer(**kwargs),
        MaskedGenerativeTransformer(text_cross_source=True, **kwargs),
    )
    args, cond = _mgt_inputs()
    params = nn.meta.unbox(source_read.init(jax.random.key(0), *args, cond_tokens=cond)["params"])
    params["text_cross_blocks_0"]["to_out"]["kernel"] = jnp.full_like(
        params["text_cross_blocks_0"]["to_out"]["kernel"], 0.3
    )

    def gate(model, tokens, **kw):
        _, state = model.apply({"params": params}, tokens, *args[1:], cond_tokens=cond, mutable=["intermediates"], **kw)
        return np.asarray(state["intermediates"]["text_cross_blocks_0"]["text_gate"][0])

    # The gate of a source-reading model does not depend on which target tokens are masked; a target-reading one's does.
    masked = jnp.full_like(args[0], 16)
    np.testing.assert_allclose(gate(source_read, args[0]), gate(source_read, masked), atol=1e-6)
    assert np.abs(gate(target_read, args[0]) - gate(target_read, masked)).max() > 1e-3
    # gamma = 0 still removes the source: the logits do not depend on the condition tokens.
    other_cond = (cond + 5) % 16
    logits = [source_read.apply({"params": params}, *args, cond_tokens=c, gamma=0.0) for c in (cond, other_cond)]
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(logits[1]), atol=1e-5)
    assert float(jnp.abs(source_read.apply({"params": params}, *args, cond_tokens=other_cond) - source_read.apply(
        {"params": params}, *args, cond_tokens=cond)).max()) > 1e-3  # fmt: skip


def test_flow_dit_text_cross_source_gates_target_tokens_by_the_reference_alone():
    kwargs = dict(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                  text_cross_attention=True, zero_init_output=False, zero_init_modulation=False)  # fmt: skip
    target_read, source_read = FlowDiT(**kwargs), FlowDiT(text_cross_source=True, **kwargs)
    rng = np.random.default_rng(0)
    x, other_x, ref = (jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32) for _ in range(3))
    text, pooled = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32), jnp.asarray(rng.normal(size=(2, 5)))
    rest = (text, pooled, jnp.full((2,), 0.5), latent_image_ids(2, 2), np.zeros((3, 3), np.float32))
    ref_kwargs = dict(ref_hidden=ref, ref_ids=latent_image_ids(2, 2, index=1))
    params = nn.meta.unbox(source_read.init(jax.random.key(0), x, *rest, **ref_kwargs)["params"])

    def gate(model, noisy):
        _, state = model.apply({"params": params}, noisy, *rest, **ref_kwargs, mutable=["intermediates"])
        return np.asarray(state["intermediates"]["text_cross_blocks_0"]["text_gate"][0])

    gates = gate(source_read, x)
    assert gates.shape == (2, 4)  # the reference tokens' gates (the target tokens get copies)
    np.testing.assert_allclose(gate(source_read, other_x), gates, atol=1e-6)  # the noisy target does not move them
    assert np.abs(gate(target_read, other_x) - gate(target_read, x)).max() > 1e-3
    velocity = [source_read.apply({"params": params}, noisy, *rest, **ref_kwargs) for noisy in (x, other_x)]
    assert float(jnp.abs(velocity[0] - velocity[1]).max()) > 1e-3  # the target still reads itself
    with pytest.raises(ValueError, match="reference tokens of the target's size"):
        source_read.apply({"params": params}, x, *rest)
