"""Tests for the flow editor (CogniEdit's SFT base) and its RL losses on a tiny editor: flow-matching loss, the one-jit
edit, config plumbing, GRPO options (the CLI runs are in `tests/test_flow_edit_cli.py`)."""

import dataclasses
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from editing_jax import config_lib
from editing_jax.methods import editmgt, flow_edit
from editing_jax.models.autoencoder import AutoencoderKL
from editing_jax.models.flow_dit import FlowDiT
from editing_jax.sampling import flow
from editing_jax.text.encoder import TextEncoder
from editing_jax.text.tokenizer import WordTokenizer
from editing_jax.train import checkpoint

VOCAB = ("make", "the", "red", "blue", "circle", "a")


@pytest.fixture(scope="module")
def tiny_flow():
    """A tiny editor on 8 px images (2x2 tokens of 16 channels), its initialized variables and a batch of 2."""
    autoencoder = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                use_mid_block=False, latent_channels=4)  # fmt: skip
    tokenizer = WordTokenizer(VOCAB, max_length=6, num_hash_buckets=4)
    text_encoder = TextEncoder(tokenizer.vocab_size, width=16, num_layers=1, num_heads=2, max_length=6, pooled_dim=8)
    dit = FlowDiT(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                  zero_init_modulation=False, zero_init_output=False)  # fmt: skip
    model = flow_edit.FlowEditor(dit, text_encoder, autoencoder, tokenizer, image_size=8, patch_size=2)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    # Random frozen autoencoder weights from NumPy: compiling its (threefry) init would take most of the fixture.
    shapes = jax.eval_shape(autoencoder.init, jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
    tokenizer_variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
    objective = flow_edit.make_objective(model, tokenizer_variables, cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=flow_edit.FlowSettings(num_steps=3))  # fmt: skip
    batch = model.prepare_batch({
        "source_image": images,
        "target_image": images[::-1].copy(),
        "instruction": np.asarray(["make the red circle blue", "make a circle"], object),
    })  # fmt: skip
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    variables = nn.meta.unbox(jax.jit(objective.init)(jax.random.key(2), arrays))
    state = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def predict(params, x, t, ids, mask, source):  # v_theta(x [B, L, C], t [B] | text, source uint8)
        return model.velocity(params, x, t, model.encode_text(params, ids, mask), model.encode(state, source))

    return types.SimpleNamespace(model=model, objective=objective, params=variables["params"], state=state,
                                 batch=batch, arrays=arrays, predict=predict)  # fmt: skip


def test_latent_stats_normalize_the_first_batch_and_round_trip(tiny_flow):
    model, state, arrays = tiny_flow.model, tiny_flow.state, tiny_flow.arrays
    both = jnp.concatenate([arrays["source_image"], arrays["target_image"]])
    packed = model.encode(state, both)  # [4, L, C]
    assert packed.shape == (4, model.token_grid**2, 4 * 4)
    np.testing.assert_allclose(float(jnp.mean(packed)), 0.0, atol=1e-5)
    np.testing.assert_allclose(float(jnp.std(packed)), 1.0, rtol=1e-4)
    # decode(encode(x)) decodes the (denormalized) posterior means: normalizing and denormalizing is exact up to
    # float32 rounding, which can move a pixel that sits on a .5 boundary by one level of 255.
    direct = model.autoencoder.apply(state["tokenizer"], model.raw_latents(state, both), method=AutoencoderKL.decode)
    expected = np.round((np.clip(np.asarray(direct), -1, 1) + 1) * 127.5).astype(np.int32)
    decoded = np.asarray(model.decode(state, packed)).astype(np.int32)
    assert np.abs(decoded - expected).max() <= 1
    assert (decoded == expected).mean() > 0.98
    # A KL run with diffusers-style scaling/shift factors set: those win over the batch statistics.
    calibrated = flow_edit.FlowEditor(model.dit, model.text_encoder,
                                      model.autoencoder.clone(scaling_factor=0.5, shift_factor=0.25),
                                      model.text_tokenizer, 8)  # fmt: skip
    stats = flow_edit.latent_stats(calibrated, state["tokenizer"], both)
    assert (float(stats["shift"]), float(stats["scale"])) == (0.25, 0.5)


def test_interpolation_and_target_match_numpy_and_the_sampler_convention():
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)  # two [B=2, L=3, C=5] arrays
    t = np.asarray([0.25, 0.8], np.float32)
    x_t = np.asarray(flow_edit.interpolate(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(x_t, (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, rtol=1e-6, atol=1e-6)
    target = np.asarray(flow_edit.velocity_target(jnp.asarray(x0), jnp.asarray(noise)))
    np.testing.assert_allclose(target, noise - x0, rtol=1e-6)
    # With the exact velocity, one Euler step of sampling.flow moves along the training path: x_0.8 -> x_0.25.
    start = flow_edit.interpolate(jnp.asarray(x0), jnp.asarray(noise), jnp.full((2,), 0.8))
    end = flow.ode_step(start, jnp.asarray(target), 0.8, 0.25)
    np.testing.assert_allclose(np.asarray(end), (0.75 * x0 + 0.25 * noise), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def train_step(tiny_flow):
    """`(params, opt_state) -> (params, opt_state, loss before the update, metrics)`: Adam on the fixed batch and
    rng key(0) (the same times and noise every step)."""
    objective, state, arrays = tiny_flow.objective, tiny_flow.state, tiny_flow.arrays
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, state, arrays, jax.random.key(0))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux.metrics

    return step, optimizer.init(tiny_flow.params)


def test_loss_regresses_the_rectified_flow_velocity(tiny_flow, train_step):
    model, params, state, arrays = tiny_flow.model, tiny_flow.params, tiny_flow.state, tiny_flow.arrays
    step, opt_state = train_step
    rng = jax.random.key(0)
    _, _, loss, metrics = step(params, opt_state)
    # By hand, in NumPy, with the loss's documented rng splits (times, noise, text dropout; dropout is 0 here).
    time_rng, noise_rng, _ = jax.random.split(rng, 3)
    x0 = np.asarray(model.encode(state, arrays["target_image"]))  # [2, L, C]
    t = np.asarray(jax.random.uniform(time_rng, (2,), minval=1e-3, maxval=1 - 1e-3))
    eps = np.asarray(jax.random.normal(noise_rng, x0.shape))
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v = np.asarray(tiny_flow.predict(params, x_t, t, arrays["text_ids"], arrays["text_mask"], arrays["source_image"]))
    per_example = np.mean((v - (eps - x0)) ** 2, axis=(1, 2))  # [2]
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-5)
    low = t < 0.5
    for key, rows in (("loss_low_t", low), ("loss_high_t", ~low)):
        np.testing.assert_allclose(float(metrics[key]), per_example[rows].mean() if rows.any() else 0.0, rtol=1e-5)


def test_text_gate_loss_is_bce_of_the_gates_against_the_edit_mask_cells(tiny_flow):
    # Everything jitted: op-by-op dispatch of these forwards costs minutes on a slow CPU.
    model = dataclasses.replace(tiny_flow.model, dit=tiny_flow.model.dit.clone(text_cross_attention=True))
    objective = flow_edit.make_objective(model, tiny_flow.state["tokenizer"], cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=flow_edit.FlowSettings(num_steps=3))  # fmt: skip
    params = nn.meta.unbox(jax.jit(objective.init)(jax.random.key(2), tiny_flow.arrays))["params"]
    edit_mask = np.zeros((2, 8, 8), np.uint8)
    edit_mask[0, 1, 1] = 1  # row 0: cell (0, 0) of the 2x2 token grid
    edit_mask[1, 5, 6] = 1  # row 1: cell (1, 1)
    arrays = dict(tiny_flow.arrays, edit_mask=jnp.asarray(edit_mask))
    rng = jax.random.key(5)
    plain = jax.jit(flow_edit.make_loss(model, cfg_dropout=0.0, timestep_sampling="uniform"))
    gated = jax.jit(flow_edit.make_loss(model, cfg_dropout=0.0, timestep_sampling="uniform", text_gate_weight=0.5))
    total, aux = gated(params, tiny_flow.state, arrays, rng)

    @jax.jit
    def gate_by_hand(params):  # the loss's forward by hand (same rng splits), then the one cross block's gate
        time_rng, noise_rng, _ = jax.random.split(rng, 3)
        x0 = model.encode(tiny_flow.state, arrays["target_image"])  # [2, 4, C]
        t = jax.random.uniform(time_rng, (2,), minval=1e-3, maxval=1 - 1e-3)
        x_t = flow_edit.interpolate(x0, jax.random.normal(noise_rng, x0.shape), t)
        text = model.encode_text(params, arrays["text_ids"], arrays["text_mask"])
        _, variables = model._apply_dit(params, x_t, t, text, model.encode(tiny_flow.state, arrays["source_image"]),
                                        mutable=["intermediates"])  # fmt: skip
        return variables["intermediates"]["text_cross_blocks_0"]["text_gate"][0]  # [2, 8]

    gate = np.asarray(gate_by_hand(params), np.float64)
    cells = np.asarray([[1, 0, 0, 0], [0, 0, 0, 1]], np.float64)
    cells = np.concatenate([cells, cells], axis=1)  # target tokens, then the reference tokens at the same cells
    expected = float(np.mean(-(cells * np.log(gate) + (1 - cells) * np.log1p(-gate))))
    np.testing.assert_allclose(float(aux.metrics["text_gate_loss"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(total) - float(plain(params, tiny_flow.state, arrays, rng)[0]), 0.5 * expected,
                               rtol=1e-4)  # fmt: skip
    grads = jax.jit(jax.grad(lambda p: gated(p, tiny_flow.state, arrays, rng)[1].metrics["text_gate_loss"]))(params)
    assert float(optax.tree.norm(grads["dit"]["text_cross_blocks_0"]["to_q"])) > 0.0
    dropped = jax.jit(flow_edit.make_loss(model, cfg_dropout=1.0, timestep_sampling="uniform", text_gate_weight=0.5))
    assert float(dropped(params, tiny_flow.state, arrays, rng)[1].metrics["text_gate_loss"]) == 0.0
    with pytest.raises(ValueError, match="edit_mask"):
        gated(params, tiny_flow.state, tiny_flow.arrays, rng)
    with pytest.raises(ValueError, match="text_cross_attention"):
        flow_edit.make_loss(tiny_flow.model, text_gate_weight=1.0)


def test_edit_weight_is_a_weighted_mean_over_the_edited_cells(tiny_flow):
    model, params, state = tiny_flow.model, tiny_flow.params, tiny_flow.state
    edit_mask = np.zeros((2, 8, 8), np.uint8)
    edit_mask[0, 1, 1] = 1  # row 0: cell (0, 0) of the 2x2 token grid
    edit_mask[1, 4:, 4:] = 1  # row 1: cell (1, 1)
    arrays = dict(tiny_flow.arrays, edit_mask=jnp.asarray(edit_mask))
    rng = jax.random.key(7)
    plain, plain_aux = flow_edit.make_loss(model, cfg_dropout=0.0, timestep_sampling="uniform")(
        params, state, arrays, rng
    )
    weighted, aux = flow_edit.make_loss(model, cfg_dropout=0.0, timestep_sampling="uniform", edit_weight=3.0)(
        params, state, arrays, rng
    )
    # The per-token squared error by hand (same rng splits as the loss).
    time_rng, noise_rng, _ = jax.random.split(rng, 3)
    x0 = model.encode(state, arrays["target_image"])  # [2, 4, C]
    t = jax.random.uniform(time_rng, (2,), minval=1e-3, maxval=1 - 1e-3)
    eps = jax.random.normal(noise_rng, x0.shape)
    v = tiny_flow.predict(params, flow_edit.interpolate(x0, eps, t), t, arrays["text_ids"], arrays["text_mask"],
                          arrays["source_image"])  # fmt: skip
    per_token = np.mean(np.square(np.asarray(v, np.float64) - np.asarray(eps - x0, np.float64)), axis=2)  # [2, 4]
    weights = np.asarray([[3, 1, 1, 1], [1, 1, 1, 3]], np.float64)
    np.testing.assert_allclose(float(plain), per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(weighted), np.sum(weights * per_token) / weights.sum(), rtol=1e-5)
    assert abs(float(weighted) - float(plain)) > 1e-6
    # The diagnostics stay the unweighted per-row errors.
    np.testing.assert_allclose(float(aux.metrics["loss_low_t"]), float(plain_aux.metrics["loss_low_t"]), rtol=1e-6)
    with pytest.raises(ValueError, match="edit_mask"):
        flow_edit.make_loss(model, edit_weight=3.0)(params, state, tiny_flow.arrays, rng)
    with pytest.raises(ValueError, match="edit_weight"):
        flow_edit.make_loss(model, edit_weight=0.0)


def test_init_from_params_fill_every_leaf_of_the_fresh_init(tiny_flow):
    previous = jax.tree.map(lambda x: x + 1.0, tiny_flow.params)  # a "trained" run, unlike any fresh init
    objective = flow_edit.make_objective(tiny_flow.model, tiny_flow.state["tokenizer"], cfg_dropout=0.0,
                                         timestep_sampling="uniform", settings=flow_edit.FlowSettings(num_steps=3),
                                         init_params=previous)  # fmt: skip
    params = nn.meta.unbox(objective.init(jax.random.key(9), tiny_flow.arrays))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(previous)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(previous), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_text_velocity_adds_the_gated_text_term_and_starts_at_zero(tiny_flow):
    crossed = dataclasses.replace(tiny_flow.model, dit=tiny_flow.model.dit.clone(text_cross_attention=True))
    model = dataclasses.replace(crossed, dit=crossed.dit.clone(text_velocity=True))
    objective = flow_edit.make_objective(model, tiny_flow.state["tokenizer"], cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=flow_edit.FlowSettings(num_steps=3))  # fmt: skip
    params = nn.meta.unbox(objective.init(jax.random.key(2), tiny_flow.arrays))["params"]
    x0 = model.encode(tiny_flow.state, tiny_flow.arrays["target_image"])  # [2, 4, C]
    t = jnp.asarray([0.3, 0.8])
    text = model.encode_text(params, tiny_flow.arrays["text_ids"], tiny_flow.arrays["text_mask"])
    reference = model.encode(tiny_flow.state, tiny_flow.arrays["source_image"])
    without = {**params, "dit": {k: v for k, v in params["dit"].items() if not k.startswith("text_velocity")}}
    base = crossed._apply_dit(without, x0, t, text, reference)
    fresh, variables = model._apply_dit(params, x0, t, text, reference, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base))  # the last layer starts at zero
    # With a zero kernel and bias b the text term is b: the velocity moves by gate * b at each target token.
    bias = np.linspace(-1.0, 1.0, x0.shape[-1]).astype(np.float32)
    text_out = dict(params["dit"]["text_velocity_out"], bias=jnp.asarray(bias))
    moved = {**params, "dit": {**params["dit"], "text_velocity_out": text_out}}
    shifted = model._apply_dit(moved, x0, t, text, reference)
    gate = np.asarray(variables["intermediates"]["text_cross_blocks_0"]["text_gate"][0])[:, : x0.shape[1]]  # [2, 4]
    np.testing.assert_allclose(np.asarray(shifted) - np.asarray(base), gate[:, :, None] * bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text_velocity needs text_cross_attention"):
        tiny_flow.model.dit.clone(text_velocity=True).init(
            jax.random.key(0), x0, text[0], text[1], t, model.image_ids(0), np.zeros((6, 3), np.float32)
        )


def test_few_steps_reduce_the_loss(tiny_flow, train_step):
    step, opt_state = train_step
    params, losses = tiny_flow.params, []
    for _ in range(20):
        params, opt_state, loss, _ = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_edit_is_the_ode_sample_of_the_model(tiny_flow):
    model, params, state, batch, arrays = (
        tiny_flow.model,
        tiny_flow.params,
        tiny_flow.state,
        tiny_flow.batch,
        tiny_flow.arrays,
    )
    settings = flow_edit.FlowSettings(num_steps=3)
    edit_fn = flow_edit.make_edit_fn(model, settings)
    out = editmgt.run_edits(edit_fn, params, state, batch, settings, seed=3)
    assert out["images"].shape == (2, 8, 8, 3) and out["images"].dtype == np.uint8
    np.testing.assert_array_equal(
        out["images"], editmgt.run_edits(edit_fn, params, state, batch, settings, seed=3)["images"]
    )
    assert not np.allclose(
        out["latents"], editmgt.run_edits(edit_fn, params, state, batch, settings, seed=4)["latents"]
    )

    # Guidance off: sampling.flow.sample by hand (ODE on every step) from the same noise, then decode.
    noise_rng, sde_rng = jax.random.split(jax.random.key(3))
    x_1 = jax.random.normal(noise_rng, out["latents"].shape)
    ids, mask, source = arrays["text_ids"], arrays["text_mask"], arrays["source_image"]
    x_0, _, _ = flow.sample(lambda x, t: tiny_flow.predict(params, x, jnp.full((2,), t), ids, mask, source), x_1,
                            timesteps=flow.timesteps(3), rng=sde_rng, noise_level=0.0,
                            sde_steps_mask=jnp.zeros((3,), bool))  # fmt: skip
    np.testing.assert_allclose(out["latents"], np.asarray(x_0), atol=1e-5)
    np.testing.assert_array_equal(out["images"], np.asarray(model.decode(state, x_0)))

    # Guidance 2 with a shifted schedule: a plain Euler loop on v_u + 2 (v_c - v_u), v_u from the empty text.
    guided = flow_edit.FlowSettings(num_steps=3, guidance_scale=2.0, shift=3.0)
    with_cfg = editmgt.run_edits(flow_edit.make_edit_fn(model, guided), params, state, batch, guided, seed=3)
    x, times = x_1, np.asarray(flow.timesteps(3, 3.0))
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = jnp.full((2,), t)
        v_c = tiny_flow.predict(params, x, t_batch, ids, mask, source)
        v_u = tiny_flow.predict(params, x, t_batch, jnp.zeros_like(ids), jnp.zeros_like(mask), source)
        x = x + (t_next - t) * (v_u + 2.0 * (v_c - v_u))
    np.testing.assert_allclose(with_cfg["latents"], np.asarray(x), atol=1e-4)
    assert not np.allclose(with_cfg["latents"], out["latents"], atol=1e-3)

    # start_time 0.5 (img2img): Euler from x_0.5 = 0.5 reference + 0.5 x_1 over the schedule scaled by 0.5.
    halfway = flow_edit.FlowSettings(num_steps=3, start_time=0.5)
    from_source = editmgt.run_edits(flow_edit.make_edit_fn(model, halfway), params, state, batch, halfway, seed=3)
    reference = model.encode(state, source)  # [2, L, C]
    x, times = 0.5 * reference + 0.5 * x_1, 0.5 * np.asarray(flow.timesteps(3))
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t) * tiny_flow.predict(params, x, jnp.full((2,), t), ids, mask, source)
    np.testing.assert_allclose(from_source["latents"], np.asarray(x), atol=1e-5)
    assert not np.allclose(from_source["latents"], out["latents"], atol=1e-3)
    # A start next to t = 0 leaves the source's latents.
    tiny_start = flow_edit.FlowSettings(num_steps=3, start_time=1e-4)
    kept = editmgt.run_edits(flow_edit.make_edit_fn(model, tiny_start), params, state, batch, tiny_start, seed=3)
    np.testing.assert_allclose(kept["latents"], np.asarray(reference), atol=1e-3)


def _lora_editor_and_rl_batch(tiny_flow):
    """The tiny editor with rank-2 adapters, and its batch with the (empty) fields the GRPO rollout reads."""
    model = dataclasses.replace(tiny_flow.model, dit=tiny_flow.model.dit.clone(lora_rank=2))
    batch = {
        **tiny_flow.arrays,
        "edit_mask": jnp.zeros((2, 8, 8), bool),
        "source_scene_bytes": jnp.zeros((2, 8), jnp.uint8),
        "target_scene_bytes": jnp.zeros((2, 8), jnp.uint8),
    }
    return model, batch


def test_mixed_only_takes_the_policy_gradient_from_groups_whose_outcomes_differ(tiny_flow):
    from editing_jax.methods import grpo

    model, batch = _lora_editor_and_rl_batch(tiny_flow)
    outcomes = {"scores": None}  # (reward, success) per sample, rows grouped as [B, G] = [2, 2]

    def fake_reward(*_):
        return outcomes["scores"]

    def policy_gradient(settings):
        objective = grpo.make_objective(model, tiny_flow.params, tiny_flow.state, settings,
                                        flow_edit.FlowSettings(num_steps=2), reward_fn=fake_reward)  # fmt: skip
        variables = objective.init(jax.random.key(0), batch)
        state = {k: v for k, v in variables.items() if k != "params"}
        grad_fn = jax.jit(jax.grad(lambda p: objective.loss(p, state, batch, jax.random.key(1))[0]))
        return lambda: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grad_fn(variables["params"]))))

    common = dict(algorithm="grpo", group_size=2, window=1, num_steps=2, advantage="group", kl_beta=0.0)
    mixed, every = (
        policy_gradient(grpo.GRPOSettings(**common, mixed_only=True)),
        policy_gradient(grpo.GRPOSettings(**common)),
    )
    one_outcome_per_group = np.array([[9, 1], [8, 1], [3, 0], [4, 0]], np.float32)
    outcomes["scores"] = one_outcome_per_group
    assert mixed() == 0.0 and every() > 0.0  # the rewards differ, the outcomes do not
    outcomes["scores"] = np.array([[9, 1], [8, 0], [3, 0], [4, 0]], np.float32)
    assert mixed() > 0.0


def test_shared_initial_noise_makes_a_group_differ_only_by_its_window(tiny_flow):
    from editing_jax.methods import grpo

    model, batch = _lora_editor_and_rl_batch(tiny_flow)

    def window_states(shared):  # (x_start, last stored state), each [B, G, L, C]
        settings = grpo.GRPOSettings(group_size=3, window=1, num_steps=3, shared_initial_noise=shared)
        reward_fn = lambda *_: np.zeros((6, 2), np.float32)  # noqa: E731
        variables = grpo.make_objective(
            model, tiny_flow.params, tiny_flow.state, settings, flow_edit.FlowSettings(num_steps=2), reward_fn
        ).init(jax.random.key(0), batch)
        policy = grpo.editor_params(variables["params"], variables)
        rollout = grpo.make_rollout_fn(model, settings, reward_fn)
        out = jax.jit(rollout)(policy, variables, batch, jax.random.key(3))
        assert int(out["start"]) > 0  # the window starts after an ODE step, which the group then shares
        return [np.asarray(x).reshape(2, 3, *x.shape[1:]) for x in (out["x_start"], out["stored"][-1])]

    start, end = window_states(shared=True)
    np.testing.assert_array_equal(start, np.repeat(start[:, :1], 3, axis=1))
    assert not np.allclose(end[:, 0], end[:, 1]) and not np.allclose(start[0, 0], start[1, 0])
    start, _ = window_states(shared=False)
    assert not np.allclose(start[:, 0], start[:, 1])


def test_window_start_max_bounds_where_the_sde_window_starts(tiny_flow):
    from editing_jax.methods import grpo

    model, batch = _lora_editor_and_rl_batch(tiny_flow)
    reward_fn = lambda *_: np.zeros((4, 2), np.float32)  # noqa: E731

    def starts(window_start_max):
        settings = grpo.GRPOSettings(group_size=2, window=1, num_steps=4, window_start_max=window_start_max)
        variables = grpo.make_objective(
            model, tiny_flow.params, tiny_flow.state, settings, flow_edit.FlowSettings(num_steps=2), reward_fn
        ).init(jax.random.key(0), batch)
        rollout = jax.jit(grpo.make_rollout_fn(model, settings, reward_fn))
        policy = grpo.editor_params(variables["params"], variables)
        return {int(rollout(policy, variables, batch, jax.random.key(seed))["start"]) for seed in range(12)}

    assert starts(-1) == {0, 1, 2, 3}  # any start in [0, num_steps - window]
    assert starts(1) == {0, 1} and starts(0) == {0}
    assert grpo.GRPOSettings(window=3, num_steps=4, window_start_max=5).last_window_start == 1
    with pytest.raises(ValueError, match="window_start_max"):
        grpo.GRPOSettings(window_start_max=-2)


@pytest.mark.parametrize("algorithm", ["grpo", "dense_grpo"])
def test_updates_per_rollout_replay_one_rollout_off_policy(tiny_flow, algorithm):
    from editing_jax.methods import grpo
    from editing_jax.train import step as step_lib

    model, batch = _lora_editor_and_rl_batch(tiny_flow)
    reward_calls = []

    def brightness_reward(source, edited, *_):  # (reward, success): brighter edits win, so advantages are nonzero
        reward_calls.append(1)
        brightness = np.asarray(edited, np.float32).mean(axis=(1, 2, 3)) / 50.0
        return np.stack([brightness, brightness > np.median(brightness)], axis=1).astype(np.float32)

    settings = grpo.GRPOSettings(algorithm=algorithm, group_size=2, window=1, num_steps=2, advantage="group",
                                 kl_beta=0.0, updates_per_rollout=2)  # fmt: skip
    objective = grpo.make_objective(model, tiny_flow.params, tiny_flow.state, settings,
                                    flow_edit.FlowSettings(num_steps=2), reward_fn=brightness_reward)  # fmt: skip
    boxed = objective.init(jax.random.key(0), batch)
    specs = nn.get_partition_spec(boxed["rollout"]["data"])
    assert specs["cond"] == jax.sharding.PartitionSpec("batch", None, None)  # [N, L, C]
    assert specs["stored"] == jax.sharding.PartitionSpec(None, "batch", None, None)  # [k, N, L, C]
    optimizer = optax.adam(1e-2)
    state = step_lib.create_state(nn.meta.unbox(boxed), optimizer, use_ema=False)
    train_step = jax.jit(step_lib.make_train_step(objective, optimizer, lambda count: 1e-2))
    metrics = []
    for _ in range(3):
        state, step_metrics = train_step(state, batch, jax.random.key(1))
        metrics.append(jax.device_get(step_metrics))
    assert len(reward_calls) == 2  # steps 1 and 3 collect, step 2 replays
    assert int(state.model_state["rollout"]["age"]) == 3
    first, replay, fresh = metrics
    assert first["log_ratio_abs"] < 1e-6  # on-policy
    assert replay["log_ratio_abs"] > 1e-4  # the same transitions under the updated policy
    assert replay["reward"] == first["reward"] and replay["window_start"] == first["window_start"]
    assert fresh["log_ratio_abs"] < 1e-6
    with pytest.raises(ValueError, match="updates_per_rollout"):
        grpo.GRPOSettings(updates_per_rollout=0)


def test_sample_times():
    rng = jax.random.key(0)
    logit_normal = np.asarray(flow_edit.sample_times(rng, 20000, "logit_normal"))
    assert 0 < logit_normal.min() and logit_normal.max() < 1 and abs(np.median(logit_normal) - 0.5) < 0.02
    assert np.mean(np.abs(logit_normal - 0.5) < 0.25) > 0.6  # concentrated mid-trajectory (uniform: 0.5)
    uniform = np.asarray(flow_edit.sample_times(rng, 20000, "uniform"))
    assert 0 < uniform.min() and uniform.max() < 1 and abs(np.mean(np.abs(uniform - 0.5) < 0.25) - 0.5) < 0.02
    with pytest.raises(ValueError, match="timestep_sampling"):
        flow_edit.sample_times(rng, 2, "cosine")


def test_settings_from_config():
    config = config_lib.load_config("configs/cogniedit/sft.py:size=32,tiny", [])
    settings = flow_edit.FlowSettings.from_config(config.sampling, guidance_scale=1.5, num_steps=None)
    assert (settings.num_steps, settings.guidance_scale, settings.shift) == (4, 1.5, 1.0)
    with pytest.raises(ValueError, match="no region_hold_threshold setting"):
        flow_edit.FlowSettings.from_config(config.sampling, region_hold_threshold=0.3)
    with pytest.raises(ValueError, match="num_steps"):
        flow_edit.FlowSettings.from_config(config.sampling, num_steps=0)
    assert flow_edit.FlowSettings.from_config(config.sampling, start_time=0.7).start_time == 0.7
    for start_time in (0.0, 1.5):
        with pytest.raises(ValueError, match="start_time must be in"):
            flow_edit.FlowSettings.from_config(config.sampling, start_time=start_time)


def test_resolve_config_needs_a_kl_run(monkeypatch):
    config = config_lib.load_config("configs/cogniedit/sft.py:size=32,tiny", [])
    config.tokenizer.checkpoint = "some/run"
    fake_run = types.SimpleNamespace(config=config_lib.load_config("configs/tokenizer/vq.py:size=32,tiny", []))
    monkeypatch.setattr(checkpoint, "load_trained", lambda path: fake_run)
    with pytest.raises(ValueError, match="tokenizer_vq run, expected tokenizer_kl"):
        flow_edit.resolve_config(config)
    assert not config.tokenizer.model_json
    fake_run.config = config_lib.load_config("configs/tokenizer/kl.py:size=32,tiny", [])
    flow_edit.resolve_config(config)
    assert json.loads(config.tokenizer.model_json)["latent_channels"] == 4 and "circle" in config.text.vocab.split()


def test_a_frozen_text_encoder_gets_no_flow_gradient_and_the_loss_is_unchanged(tiny_flow):
    params = tiny_flow.params
    rng = jax.random.key(5)
    losses = {flag: flow_edit.make_loss(tiny_flow.model, cfg_dropout=0.0, timestep_sampling="uniform",
                                        train_text_encoder=flag) for flag in (True, False)}  # fmt: skip
    values = {flag: float(loss(params, tiny_flow.state, tiny_flow.arrays, rng)[0]) for flag, loss in losses.items()}
    np.testing.assert_allclose(values[False], values[True], rtol=1e-6)
    grads = {flag: jax.grad(lambda p, f=loss: f(p, tiny_flow.state, tiny_flow.arrays, rng)[0])(params)
             for flag, loss in losses.items()}  # fmt: skip
    mass = {flag: {name: sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree)) for name, tree in g.items()}
            for flag, g in grads.items()}  # fmt: skip
    assert mass[True]["text_encoder"] > 0.0 and mass[False]["text_encoder"] == 0.0
    assert mass[False]["dit"] > 0.0


def test_a_source_read_gate_is_supervised_by_the_target_cells_once(tiny_flow):
    dit = tiny_flow.model.dit.clone(text_cross_attention=True, text_cross_source=True)
    model = dataclasses.replace(tiny_flow.model, dit=dit)
    objective = flow_edit.make_objective(model, tiny_flow.state["tokenizer"], cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=flow_edit.FlowSettings(num_steps=3))  # fmt: skip
    params = nn.meta.unbox(objective.init(jax.random.key(2), tiny_flow.arrays))["params"]
    edit_mask = np.zeros((2, 8, 8), np.uint8)
    edit_mask[:, :4, :4] = 1  # cell (0, 0) of the 2x2 token grid in both rows
    arrays = dict(tiny_flow.arrays, edit_mask=jnp.asarray(edit_mask))
    rng = jax.random.key(5)
    gated = flow_edit.make_loss(model, cfg_dropout=0.0, timestep_sampling="uniform", text_gate_weight=1.0)
    _, aux = gated(params, tiny_flow.state, arrays, rng)
    text = model.encode_text(params, arrays["text_ids"], arrays["text_mask"])
    x_t = jnp.zeros((2, 4, model.token_channels))  # the gate does not depend on the noisy target, only on t
    t = jax.random.uniform(jax.random.split(rng, 3)[0], (2,), minval=1e-3, maxval=1 - 1e-3)  # the loss's times
    _, variables = model._apply_dit(params, x_t, t, text,
                                    model.encode(tiny_flow.state, arrays["source_image"]), mutable=["intermediates"])  # fmt: skip
    gate = variables["intermediates"]["text_cross_blocks_0"]["text_gate"][0]  # [B, 4]
    cells = jnp.asarray([[1.0, 0.0, 0.0, 0.0]] * 2)
    expected, _ = editmgt.text_gate_bce(gate, cells, jnp.ones((2,)))
    np.testing.assert_allclose(float(aux.metrics["text_gate_loss"]), float(expected), rtol=1e-5)
