"""Tests for Dynamic Token Focus Relocation: exact replacement, the straight-through gradient, the window bounds, the
FlowDiT integration and the GRPO reference policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editing_jax.methods import grpo
from editing_jax.models import token_focus
from editing_jax.models.flow_dit import FlowDiT, latent_image_ids

B, LT, D, XI = 3, 7, 8, 3


def _text(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, LT, D))


def test_hard_relocation_replaces_exactly_the_window():
    text = np.asarray(_text())
    soft = np.asarray(jax.random.normal(jax.random.key(1), (XI, D)))
    starts = np.array([0, 2, LT - XI])
    weights = np.eye(LT - XI + 1, dtype=np.float32)[starts]
    out = np.asarray(token_focus.relocate(jnp.asarray(text), jnp.asarray(soft), jnp.asarray(weights), jnp.float32(1)))
    expected = text.copy()
    for b, s in enumerate(starts):
        expected[b, s : s + XI] = soft
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # gate 0 is the identity; gate 0.5 is halfway.
    same = token_focus.relocate(jnp.asarray(text), jnp.asarray(soft), jnp.asarray(weights), jnp.float32(0))
    np.testing.assert_array_equal(np.asarray(same), text)
    half = token_focus.relocate(jnp.asarray(text), jnp.asarray(soft), jnp.asarray(weights), jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(half), 0.5 * (text + expected), atol=1e-6)


def test_window_and_placement_tables():
    band = token_focus.window_matrix(5, 2)
    assert band.shape == (4, 5) and (band.sum(1) == 2).all() and band[3, 3] == band[3, 4] == 1
    placement = token_focus.placement_tensor(5, 2)
    np.testing.assert_array_equal(placement.sum(-1), band)  # every covered position gets exactly one soft token
    with pytest.raises(ValueError, match="focus window"):
        token_focus.window_matrix(3, 4)


def _module(**kwargs):
    return token_focus.TokenFocus(num_tokens=XI, **kwargs)


def test_gate_zero_is_the_identity_and_the_analysis_is_sown():
    text = _text()
    mask = jnp.arange(LT)[None] < jnp.array([[LT], [4], [0]])  # full, 4 real tokens, empty text
    module = _module()
    params = module.init(jax.random.key(0), text, mask)
    out, state = module.apply(params, text, mask, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(text))
    start = np.asarray(state["intermediates"]["focus_start"][0])
    assert start[1] + XI <= 4 and start[2] == 0  # windows stay inside the real text; no text: start 0
    probs = np.asarray(state["intermediates"]["start_probs"][0])
    assert probs.shape == (B, LT - XI + 1) and np.allclose(probs.sum(-1), 1.0) and probs[1, 4 - XI + 1 :].max() < 1e-6
    importance = np.asarray(state["intermediates"]["token_importance"][0])
    assert np.allclose(importance[:2].sum(-1), 1.0) and importance[1, 4:].max() < 1e-6


def test_straight_through_forward_is_hard_and_its_gradient_is_the_soft_one():
    text = _text()
    readout = jax.random.normal(jax.random.key(3), (B, LT, D))
    hard, soft = _module(gate_init=1.0), _module(gate_init=1.0, relaxation="soft")
    params = hard.init(jax.random.key(0), text)
    out, state = hard.apply(params, text, mutable=["intermediates"])
    start = np.asarray(state["intermediates"]["focus_start"][0])
    tokens = np.asarray(params["params"]["soft_tokens"])
    for b in range(B):  # forward: an exact replacement at the argmax start
        np.testing.assert_allclose(np.asarray(out[b, start[b] : start[b] + XI]), tokens, atol=1e-6)

    def linear_loss(module, p):
        return jnp.sum(module.apply(p, text) * readout)

    # For a loss linear in the output the gradient does not depend on the forward value, so the straight-through
    # gradient must equal the soft relaxation's, and it reaches the predictor.
    g_hard = jax.grad(lambda p: linear_loss(hard, p))(params)["params"]["predictor"]["kernel"]
    g_soft = jax.grad(lambda p: linear_loss(soft, p))(params)["params"]["predictor"]["kernel"]
    np.testing.assert_allclose(np.asarray(g_hard), np.asarray(g_soft), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_hard).max()) > 1e-4
    with pytest.raises(ValueError, match="relaxation"):
        _module(relaxation="gumbel").init(jax.random.key(0), text)


def _dit(**kwargs):
    return FlowDiT(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                   zero_init_modulation=False, zero_init_output=False, **kwargs)  # fmt: skip


def _dit_inputs():
    keys = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(keys[0], (2, 4, 6))
    text = jax.random.normal(keys[1], (2, 5, 12))
    pooled = jax.random.normal(keys[2], (2, 10))
    ref = jax.random.normal(keys[3], (2, 4, 6))
    mask = jnp.array([[True] * 5, [True, True, True, False, False]])
    return (x, text, pooled, jnp.array([0.3, 0.8]), latent_image_ids(2, 2), np.zeros((5, 3), np.float32)), dict(
        ref_hidden=ref, ref_ids=latent_image_ids(2, 2, 1), txt_mask=mask
    )


def test_flow_dit_token_focus_starts_as_the_base_model_and_trains():
    args, kwargs = _dit_inputs()
    base = _dit()
    focused = _dit(token_focus_tokens=2)
    assert focused.focus_layers == (0, 1) and _dit(token_focus_tokens=2, token_focus_layers=(1,)).focus_layers == (1,)
    params = focused.init(jax.random.key(0), *args, **kwargs)["params"]
    assert {"token_focus_0", "token_focus_1"} <= set(params)
    focus, rest = grpo.split_focus(params)
    np.testing.assert_array_equal(
        np.asarray(focused.apply({"params": params}, *args, **kwargs)),
        np.asarray(base.apply({"params": rest}, *args, **kwargs)),
    )  # gate 0: exactly the base DiT
    opened = grpo.join_lora(rest, {k: {**v, "gate": jnp.float32(1)} for k, v in focus.items()})
    moved = focused.apply({"params": opened}, *args, **kwargs)
    assert float(jnp.abs(moved - base.apply({"params": rest}, *args, **kwargs)).max()) > 1e-4
    # The reference policy zeroes the gates (and the adapters), so it is the base again.
    reference = grpo.policy_dit({"lora": {}, "focus": {k: opened[k] for k in focus}}, rest, reference=True)
    np.testing.assert_array_equal(
        np.asarray(focused.apply({"params": reference}, *args, **kwargs)),
        np.asarray(base.apply({"params": rest}, *args, **kwargs)),
    )
    with pytest.raises(ValueError, match="outside"):
        _ = _dit(token_focus_tokens=2, token_focus_layers=(5,)).focus_layers


def test_collect_focus_stacks_layers():
    args, kwargs = _dit_inputs()
    focused = _dit(token_focus_tokens=2)
    params = focused.init(jax.random.key(0), *args, **kwargs)
    _, state = focused.apply(params, *args, **kwargs, mutable=["intermediates"])
    maps = token_focus.collect_focus(state["intermediates"], focused.focus_layers)
    assert maps["focus_start"].shape == (2, 2) and maps["start_probs"].shape == (2, 2, 4)
    assert maps["token_importance"].shape == (2, 2, 5) and int(maps["focus_start"][:, 1].max()) <= 1
    with pytest.raises(KeyError, match="token_focus_3"):
        token_focus.collect_focus(state["intermediates"], (3,))
