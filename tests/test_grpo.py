"""Tests for Flow-GRPO / Dense GRPO: advantages, surrogates, the window recomputation, LoRA split, scene bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editing_jax.methods import grpo
from editing_jax.sampling import flow

NUM_STEPS, NOISE = 6, 0.7


def test_batch_and_group_advantages_match_numpy():
    rewards = np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 16.0]], np.float32)
    batch = np.asarray(grpo.compute_advantages(jnp.asarray(rewards), "batch", clip=100.0, eps=0.0))
    np.testing.assert_allclose(batch, (rewards - rewards.mean()) / rewards.std(), rtol=1e-5)
    group = np.asarray(grpo.compute_advantages(jnp.asarray(rewards), "group", clip=100.0, eps=0.0))
    expected = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)
    np.testing.assert_allclose(group, expected, rtol=1e-5)
    # Batch statistics keep the between-instance signal that per-group statistics remove.
    assert batch[1].mean() > batch[0].mean() and abs(group[1].mean() - group[0].mean()) < 1e-5
    assert np.abs(np.asarray(grpo.compute_advantages(jnp.asarray(rewards), "batch", clip=0.5))).max() <= 0.5


def test_success_bonus_ranks_a_success_above_more_partial_credit():
    scores = jnp.asarray([[9.0, 1.0], [11.0, 0.0], [3.0, 0.0]], jnp.float32)  # (reward, success)
    np.testing.assert_array_equal(np.asarray(grpo.advantage_rewards(scores, 0.0)), [9.0, 11.0, 3.0])
    shaped = np.asarray(grpo.advantage_rewards(scores, 5.0))
    np.testing.assert_array_equal(shaped, [14.0, 11.0, 3.0])
    advantages = np.asarray(grpo.compute_advantages(jnp.asarray(shaped)[None], "batch"))[0]
    assert advantages[0] > advantages[1] > advantages[2]
    with pytest.raises(ValueError, match="success_bonus"):
        grpo.GRPOSettings(success_bonus=-1.0)


def test_mixed_outcome_groups_alone_get_advantages_with_statistics_over_them():
    success = jnp.asarray([[1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 1]], jnp.float32)
    keep = np.asarray(grpo.mixed_outcome_mask(success))
    np.testing.assert_array_equal(keep, [[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]])
    rewards = np.array([[9.0, 4.0, 2.0], [14.0, 13.0, 15.0], [1.0, 2.0, 3.0], [5.0, 10.0, 12.0]], np.float32)
    batch = np.asarray(grpo.compute_advantages(jnp.asarray(rewards), "batch", clip=100.0, eps=0.0, keep=keep))
    kept = rewards[[0, 3]]
    np.testing.assert_allclose(batch[[0, 3]], (kept - kept.mean()) / kept.std(), rtol=1e-5)
    np.testing.assert_array_equal(batch[[1, 2]], 0.0)
    group = np.asarray(grpo.compute_advantages(jnp.asarray(rewards), "group", clip=100.0, eps=0.0, keep=keep))
    np.testing.assert_allclose(group[[0, 3]], (kept - kept.mean(1, keepdims=True)) / kept.std(1, keepdims=True),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_array_equal(group[[1, 2]], 0.0)
    nothing_kept = grpo.compute_advantages(jnp.asarray(rewards), "batch", keep=np.zeros_like(keep))
    np.testing.assert_array_equal(np.asarray(nothing_kept), 0.0)  # finite: no division by zero


@pytest.mark.parametrize("surrogate", ["ppo", "dense"])
def test_surrogates_clip_the_gradient_only_beyond_the_trust_region(surrogate):
    fn = grpo.ppo_surrogate if surrogate == "ppo" else grpo.dense_surrogate
    eps = 0.2
    grad = jax.grad(lambda lr, a: fn(lr, a, eps))
    # On policy (log ratio 0) the loss is -A and the gradient -A (the REINFORCE direction).
    assert float(fn(0.0, 2.0, eps)) == pytest.approx(-2.0)
    assert float(grad(0.0, 2.0)) == pytest.approx(-2.0)
    far = float(np.log(1.5))  # ratio 1.5 > 1 + eps
    assert float(grad(far, 2.0)) == 0.0  # A > 0 and already above 1 + eps: no further push
    assert float(grad(far, -2.0)) != 0.0  # A < 0: the pessimistic branch keeps the gradient
    assert float(grad(-far, -2.0)) == 0.0


def _toy_velocity(theta):
    """v(x, t) = theta[0] * x + theta[1] * t: a two-parameter 'policy' with exact float64-friendly math."""
    return lambda x, t: theta[0] * x + theta[1] * t


@pytest.fixture(scope="module")
def rollout():
    theta = jnp.array([0.3, -0.5])
    x_T = jax.random.normal(jax.random.key(0), (3, 4, 2))
    schedule = flow.timesteps(NUM_STEPS, 1.0)
    start, k = 2, 3
    mask = flow.sde_window_mask(NUM_STEPS, start, k)
    rng = jax.random.key(1)
    _, trajectory, log_probs = flow.sample(_toy_velocity(theta), x_T, timesteps=schedule, rng=rng,
                                           noise_level=NOISE, sde_steps_mask=mask)  # fmt: skip
    keys = jax.random.split(rng, NUM_STEPS)[start : start + k]
    noises = jax.vmap(lambda key: jax.random.normal(key, x_T.shape))(keys)
    window = (trajectory[start], trajectory[start + 1 : start + k + 1], noises, schedule[start : start + k + 1])
    return theta, window, log_probs[start : start + k]


@pytest.mark.parametrize("dense", [False, True])
def test_on_policy_window_reproduces_the_rollout_log_probs(rollout, dense):
    theta, window, old = rollout
    velocity = _toy_velocity(theta)
    new, kl = grpo.window_log_probs(velocity, velocity, *window, NOISE, dense=dense)
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), atol=1e-5)  # importance ratio 1
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-12)  # reference == policy


def test_dense_gradient_credits_earlier_steps_and_remat_is_exact(rollout):
    theta, window, _ = rollout
    reference = _toy_velocity(jnp.array([0.0, 0.0]))

    def total(theta, dense, remat=True, steps=None):
        log_probs, kl = grpo.window_log_probs(_toy_velocity(theta), reference, *window, NOISE, dense=dense,
                                              remat=remat)  # fmt: skip
        return jnp.sum(log_probs[:steps]) + jnp.sum(kl[:steps])

    teacher = jax.grad(total)(theta, False)
    dense = jax.grad(total)(theta, True)
    assert not np.allclose(np.asarray(teacher), np.asarray(dense), rtol=1e-3)  # trajectory gradient present
    # The first step has no earlier step to credit: identical gradients.
    np.testing.assert_allclose(jax.grad(total)(theta, False, steps=1), jax.grad(total)(theta, True, steps=1),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(jax.grad(total)(theta, True, False), dense, rtol=1e-5)  # remat changes nothing


def test_lora_split_join_and_zero_adapters():
    params = {"block": {"attn": {"kernel": jnp.ones((2, 3)), "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 3))},
                        "norm": {"scale": jnp.ones(3)}}}  # fmt: skip
    lora, base = grpo.split_lora(params)
    assert set(lora["block"]["attn"]) == {"lora_a", "lora_b"} and "norm" not in lora["block"]
    assert "lora_a" not in base["block"]["attn"]
    joined = grpo.join_lora(base, lora)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    zeroed = grpo.zero_adapters(lora)
    np.testing.assert_array_equal(zeroed["block"]["attn"]["lora_b"], 0.0)
    np.testing.assert_array_equal(zeroed["block"]["attn"]["lora_a"], 1.0)


def test_scene_strings_round_trip_through_bytes():
    scenes = ['{"objects": []}', "caf\u00e9 \u2192 tea"]
    data = grpo.encode_strings(scenes, 64)
    assert data.shape == (2, 64) and data.dtype == np.uint8
    assert grpo.decode_strings(data) == scenes
    with pytest.raises(ValueError, match="more than 4"):
        grpo.encode_strings(["too long"], 4)


def test_brightness_reward_scores_brightness_and_keeps_the_verifier_success():
    from editing_jax.data.world import edits

    samples = [edits.generate_sample("test", 0, i, edits.WorldConfig(size=32)) for i in range(4)]
    examples = [s.to_example() for s in samples]
    source = np.stack([s.source_image for s in samples])  # [4, 32, 32, 3] uint8
    target = np.stack([s.target_image for s in samples])
    edited = np.concatenate([target[:2], source[2:3], np.full_like(source[3:], 255)])  # two right, a no-op, white
    args = (target, grpo.encode_strings([e["source_scene"] for e in examples]),
            grpo.encode_strings([e["target_scene"] for e in examples]),
            np.stack([e["edit_mask"] for e in examples]))  # fmt: skip
    world = grpo.host_world_reward(source, edited, *args)
    bright = grpo.host_brightness_reward(source, edited, *args)
    assert bright.shape == (4, 2) and bright.dtype == np.float32
    np.testing.assert_allclose(bright[:, 0], 15.0 * edited.mean(axis=(1, 2, 3)) / 255.0, rtol=1e-6)
    assert bright[3, 0] == pytest.approx(15.0)
    np.testing.assert_array_equal(bright[:, 1], world[:, 1])
    assert world[:2, 1].tolist() == [1.0, 1.0] and world[3, 1] == 0.0
    fidelity = grpo.host_world_fidelity_reward(source, edited, *args)
    np.testing.assert_array_equal(fidelity[:, 1], world[:, 1])
    bonus = fidelity[:, 0] - world[:, 0]  # [4]: the target-fidelity term
    np.testing.assert_allclose(bonus[:2], 5.0, rtol=1e-6)  # the exact targets
    np.testing.assert_array_equal(bonus[2:], 0.0)  # the no-op and white: L1 to the target inside the mask > 0.1
    assert set(grpo.REWARD_FNS) == set(grpo.REWARDS)


def test_target_fidelity_is_the_l1_inside_the_edit_mask_on_a_0_to_5_scale():
    target = np.zeros((3, 4, 4, 3), np.uint8)
    edited = target.copy()
    edited[:, :2] = 51  # the top half off by 0.2 in [0, 1] units
    mask = np.zeros((3, 4, 4), bool)
    mask[0, :2], mask[1, 2:] = True, True  # row 0: the mask on the wrong half; row 1: on the right half; row 2: empty
    np.testing.assert_allclose(grpo.target_fidelity(edited, target, mask), [0.0, 5.0, 5.0])
    np.testing.assert_allclose(grpo.target_fidelity(edited, target, mask, l1_scale=0.4), [2.5, 5.0, 5.0])


def test_settings_validation():
    with pytest.raises(ValueError, match="algorithm"):
        grpo.GRPOSettings(algorithm="ppo")
    with pytest.raises(ValueError, match="window"):
        grpo.GRPOSettings(window=11, num_steps=10)
    with pytest.raises(ValueError, match="group_size"):
        grpo.GRPOSettings(group_size=1)
    with pytest.raises(ValueError, match="reward"):
        grpo.GRPOSettings(reward="aesthetic")
