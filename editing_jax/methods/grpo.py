"""Flow-GRPO and CogniEdit's Dense GRPO on the flow editor, as one trainer objective (LoRA on a frozen SFT base).

Each train step is on-policy and self-contained (with `updates_per_rollout` U > 1, steps 1-3 run every U-th step and
the rollout is replayed from the model state in between, as PPO's epochs: see `make_loss`):
  1. Rollout (no gradient): the batch's B inputs are repeated G times; every sample integrates the ODE from noise
     except an SDE window of k consecutive steps [r, r + k) starting at a random r (one r per step, shared by the
     batch; `window_start_max` bounds r, 0 = always the first, highest-noise steps), recording the window's
     states, noises and Gaussian log-probs (`sampling.flow`). With `shared_initial_noise` the G samples of an
     input start from the same noise, so they reach the window in the same state and differ only by the window's
     noises, the actions the policy loss credits.
  2. Reward: the decoded edits are scored on the host by `rewards.world.WorldReward` (alignment + coherence +
     consistency, each on [0, 5]) through `jax.pure_callback`; scene graphs travel as padded UTF-8 byte arrays
     (`reward='brightness'`: the edit's mean brightness instead, a sanity check of the RL machinery;
     `reward='world_fidelity'`: plus closeness to the world's target image inside the edit mask, a diagnostic).
  3. Advantages over the whole batch: A = clip((R - mean) / (std + eps), -c, c) with mean and std over all B x G
     rewards (CogniEdit's batch-level statistics, vs Flow-GRPO's per-prompt groups: `advantage='group'`);
     with `success_bonus` > 0, verifier successes get that bonus before the standardization (`advantage_rewards`);
     with `mixed_only`, only groups whose verifier outcomes differ (some of the G samples succeed, some fail) get
     advantages, their statistics are taken over those groups alone, and the policy loss is averaged over their
     samples (`mixed_outcome_mask`; DAPO's dynamic-sampling filter without the resampling).
  4. Policy loss on the window, averaged over the B x G samples:
     * 'grpo' (Flow-GRPO): teacher-forced per-step ratios rho_i = p_theta(x_{i+1} | x_i) / p_old(...) with the PPO
       clip, loss = mean_i max(-A rho_i, -A clip(rho_i, 1 - eps, 1 + eps));
     * 'dense_grpo' (CogniEdit eqs. 7-9, Algorithm 1): the window is re-simulated from the stored x_r with the stored
       noises, x~_{i+1} = mu_theta(x~_i) + std_i * noise_i, where the velocity sees sg(x~_i) but mu is linear in x~_i,
       so each step's log-prob also credits the earlier steps' updates. The log-ratio is summed over the k steps and
       clipped to [-log(1 + eps), log(1 + eps)]: loss = max(-A rho, -A exp(clip(log rho))).
     Both add beta * KL(p_theta || p_ref) per step, 0.5 * mean((mu_theta - mu_ref)^2) / std^2, with the reference
     policy = the SFT base (LoRA zeroed), evaluated at the same states.
  On-policy the ratio is exactly 1, so clipping only matters in the gradient's sign-consistent region; step (1)
  completes to x_0 without gradient before the reward, as in Algorithm 1. Each window step's velocity is wrapped in
  `jax.checkpoint` (`grpo.remat`), so memory grows with k by one latent per step rather than one activation set
  (benchmarks/dense_grpo_memory.py).

Trainable params are the LoRA adapters ({'lora': ...}) and, when the DiT has Dynamic Token Focus Relocation
(`model.token_focus_tokens > 0`, `models.token_focus`), the focus modules ({'focus': ...}: predictor, soft tokens
and gate, freshly initialized; the SFT run has none). The reference policy zeroes both the adapters' `lora_b` and the
focus gates, so it is the SFT base exactly. The SFT base DiT, the text encoder and the frozen
autoencoder ride in the model state, so AdamW's weight decay never touches the base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.methods import editmgt, flow_edit
from editing_jax.models.flow_dit import LORA_LEAVES
from editing_jax.sampling import flow
from editing_jax.train.objective import Batch, LossAux, Objective

PyTree = Any
ALGORITHMS = ("grpo", "dense_grpo")
ADVANTAGES = ("batch", "group")
SCENE_BYTES = 4096  # Padded UTF-8 length of a scene-graph JSON in a device batch.


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Hyper-parameters of the RL objective (CogniEdit defaults: k = 5, clip 1e-4 in their code, beta 0.01)."""

    algorithm: str = "dense_grpo"
    group_size: int = 4
    window: int = 5
    num_steps: int = 10
    shift: float = 1.0
    noise_level: float = 0.7
    clip_range: float = 0.2
    advantage: str = "batch"
    advantage_clip: float = 5.0
    kl_beta: float = 0.01
    remat: bool = True
    success_bonus: float = 0.0
    mixed_only: bool = False
    updates_per_rollout: int = 1
    reward: str = "world"
    shared_initial_noise: bool = False
    window_start_max: int = -1

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if not 1 <= self.window <= self.num_steps:
            raise ValueError(f"window must be in [1, num_steps={self.num_steps}], got {self.window}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples), got {self.group_size}")
        if self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        if self.success_bonus < 0:
            raise ValueError(f"success_bonus must be >= 0, got {self.success_bonus}")
        if self.window_start_max < -1:
            raise ValueError(f"window_start_max must be -1 (any start) or >= 0, got {self.window_start_max}")

    @property
    def last_window_start(self) -> int:
        """The largest window start r the rollout draws: num_steps - window, or less with `window_start_max`."""
        last = self.num_steps - self.window
        return last if self.window_start_max < 0 else min(self.window_start_max, last)


# ---- advantages and surrogate losses (pure, tested against NumPy) ----------------------------------------------


def compute_advantages(rewards: jax.Array, mode: str = "batch", clip: float = 5.0, eps: float = 1e-6,
                       keep: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """rewards `[B, G]` -> advantages `[B, G]`: standardized over all B x G ('batch') or per row ('group').

    `keep` `[B, G]` (0/1): the statistics are over the kept rewards only and the others get advantage 0.
    """
    axes = None if mode == "batch" else -1
    if mode not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {mode!r}")
    keep = jnp.ones_like(rewards) if keep is None else keep.astype(rewards.dtype)
    mean = masked_mean(rewards, keep, axes, keepdims=True)
    std = jnp.sqrt(masked_mean((rewards - mean) ** 2, keep, axes, keepdims=True))
    return keep * jnp.clip((rewards - mean) / (std + eps), -clip, clip)


def masked_mean(values: jax.Array, keep: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Mean of `values` over the entries where `keep` is 1 (0 where nothing is kept)."""
    count = jnp.maximum(jnp.sum(keep, axis=axis, keepdims=keepdims), 1.0)
    return jnp.sum(keep * values, axis=axis, keepdims=keepdims) / count


def mixed_outcome_mask(success: jax.Array) -> jax.Array:
    """success `[B, G]` (0/1) -> `[B, G]` float: 1 on every sample of a group whose outcomes differ, else 0.

    A group that all fails or all succeeds says nothing about what makes an edit succeed; its advantages come only
    from differences in partial credit (in our unfiltered runs the world reward rose while success stayed flat).
    """
    varied = jnp.max(success, axis=-1, keepdims=True) > jnp.min(success, axis=-1, keepdims=True)  # [B, 1]
    return jnp.broadcast_to(varied, success.shape).astype(jnp.float32)


def advantage_rewards(scores: jax.Array, success_bonus: float) -> jax.Array:
    """scores `[N, 2]` (reward, verifier success) -> the `[N]` rewards the advantages are computed from.

    `success_bonus` > 0 adds that much for a successful edit, so the policy is pushed towards whole successes rather
    than partial credit (the world reward alone rose with success flat in our 400-step runs; not in CogniEdit).
    """
    return scores[:, 0] + success_bonus * scores[:, 1]


def ppo_surrogate(log_ratio: jax.Array, advantages: jax.Array, clip_range: float) -> jax.Array:
    """Per-element PPO loss max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log_ratio)."""
    ratio = jnp.exp(log_ratio)
    return jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range))


def dense_surrogate(log_ratio_sum: jax.Array, advantages: jax.Array, clip_range: float) -> jax.Array:
    """Dense GRPO's loss for a window's summed log-ratio, clipped in log space to [-log(1+eps), log(1+eps)]."""
    bound = jnp.log1p(clip_range)
    ratio, clipped = jnp.exp(log_ratio_sum), jnp.exp(jnp.clip(log_ratio_sum, -bound, bound))
    return jnp.maximum(-advantages * ratio, -advantages * clipped)


# ---- the window recomputation ----------------------------------------------------------------------------------


def window_log_probs(velocity_fn, ref_velocity_fn, x_start: jax.Array, stored: jax.Array, noises: jax.Array,
                     times: jax.Array, noise_level: float, *, dense: bool, remat: bool = True):  # fmt: skip
    """Log-probs and KL of a window's stored transitions under the current policy.

    Args:
      velocity_fn / ref_velocity_fn: `(x [N, ...], t []) -> v` of the policy / the reference policy.
      x_start: `[N, ...]` stored state at the window's first time.
      stored: `[k, N, ...]` stored states after each window step.
      noises: `[k, N, ...]` the standard-normal noises that produced them.
      times: `[k + 1]` the window's times.
      noise_level: Flow-GRPO's a.
      dense: re-simulate the states from x_start with the stored noises (gradient through the trajectory); else
        teacher-force the stored states (Flow-GRPO).
      remat: rematerialize each step's velocity in the backward pass.

    Returns:
      (log_probs `[k, N]`, kl `[k, N]`).
    """

    def step(x, inputs):
        target, noise, t, t_next = inputs
        frozen_x = jax.lax.stop_gradient(x)
        v = velocity_fn(frozen_x, t)
        v_ref = jax.lax.stop_gradient(ref_velocity_fn(frozen_x, t))
        _, log_prob, mean, std = flow.sde_step(x, v, t, t_next, noise_level=noise_level, prev_sample=target)
        _, _, ref_mean, _ = flow.sde_step(x, v_ref, t, t_next, noise_level=noise_level, prev_sample=target)
        kl = 0.5 * jnp.mean(jnp.square(mean - ref_mean), axis=tuple(range(1, x.ndim))) / jnp.square(std)  # [N]
        x_next = mean + std * noise if dense else jax.lax.stop_gradient(target)
        return x_next, (log_prob, kl)

    if remat:
        step = jax.checkpoint(step)
    _, (log_probs, kl) = jax.lax.scan(step, x_start.astype(jnp.float32), (stored, noises, times[:-1], times[1:]))
    return log_probs, kl


# ---- LoRA split ------------------------------------------------------------------------------------------------


def split_lora(params: Mapping) -> tuple[dict, dict]:
    """(adapters only, base only) nested dicts of a LoRA model's params; `join_lora` inverts it."""
    lora, base = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub_lora, sub_base = split_lora(value)
            if sub_lora:
                lora[key] = sub_lora
            if sub_base:
                base[key] = sub_base
        elif key in LORA_LEAVES:
            lora[key] = value
        else:
            base[key] = value
    return lora, base


def join_lora(base: Mapping, lora: Mapping) -> dict:
    out = dict(base)
    for key, value in lora.items():
        out[key] = join_lora(base.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


def split_focus(params: Mapping) -> tuple[dict, dict]:
    """(token-focus modules, everything else) of a DiT param tree; `join_lora` joins them back."""
    focus = {k: v for k, v in params.items() if k.startswith("token_focus_")}
    return focus, {k: v for k, v in params.items() if k not in focus}


def _zero_leaves(tree: Mapping, name: str) -> dict:
    """`tree` with every leaf called `name` zeroed."""
    return {k: _zero_leaves(v, name) if isinstance(v, Mapping) else (jnp.zeros_like(v) if k == name else v)
            for k, v in tree.items()}  # fmt: skip


def zero_gates(focus: Mapping) -> dict:
    """Token-focus params with every gate zeroed: the modules then pass the text through unchanged."""
    return _zero_leaves(focus, "gate")


def policy_dit(params: Mapping, base: Mapping, *, reference: bool = False) -> dict:
    """The DiT params of the policy (or, with `reference`, of the SFT base) from the trainable params and the base."""
    lora, focus = params["lora"], params.get("focus", {})
    if reference:
        lora, focus = zero_adapters(lora), zero_gates(focus)
    return join_lora(join_lora(base, lora), focus)


def zero_adapters(lora: Mapping) -> dict:
    """The adapters with every lora_b zeroed: the LoRA model then computes the base model exactly."""
    return _zero_leaves(lora, "lora_b")


# ---- scenes as bytes and the host reward -----------------------------------------------------------------------


def encode_strings(strings, length: int = SCENE_BYTES) -> np.ndarray:
    """Strings -> zero-padded UTF-8 bytes `[B, length]` uint8 (so they can enter a jitted step)."""
    out = np.zeros((len(strings), length), np.uint8)
    for i, text in enumerate(strings):
        data = str(text).encode("utf-8")
        if len(data) > length:
            raise ValueError(f"string {i} has {len(data)} bytes, more than {length}")
        out[i, : len(data)] = np.frombuffer(data, np.uint8)
    return out


def decode_strings(data: np.ndarray) -> list[str]:
    return [bytes(row[row != 0]).decode("utf-8") for row in np.asarray(data)]


def host_world_reward(source, edited, target, source_scene, target_scene, edit_mask) -> np.ndarray:
    """float32 `[N, 2]`: (reward in [0, 15], verifier success) of uint8 edits, via `WorldReward` on the host.

    Every reward callback (`REWARD_FNS`) takes (source, edited, target images `[N, S, S, 3]` uint8, source and target
    scene bytes, edit mask `[N, S, S]`); this one grades scene graphs and does not read `target`.
    """
    from editing_jax.rewards.world import WorldReward

    del target

    infos = [
        {"source_scene": s, "target_scene": t, "edit_mask": np.asarray(m)}
        for s, t, m in zip(decode_strings(source_scene), decode_strings(target_scene), edit_mask, strict=True)
    ]
    out = WorldReward()(np.asarray(source), np.asarray(edited), [""] * len(infos), infos)
    return np.stack([out["reward"], out["success"]], axis=-1).astype(np.float32)


def mean_brightness(images) -> np.ndarray:
    """uint8 `[N, H, W, 3]` -> float32 `[N]`: each image's mean pixel value in [0, 1]."""
    return np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0


def host_brightness_reward(source, edited, target, source_scene, target_scene, edit_mask) -> np.ndarray:
    """float32 `[N, 2]`: (15 * mean brightness of the edit in [0, 1], world verifier success).

    A sanity-check reward for the RL machinery (DDPO's compressibility plays this part): any working policy gradient
    raises it quickly. The verifier's success is still reported, so the log shows what chasing it costs the edits.
    """
    success = host_world_reward(source, edited, target, source_scene, target_scene, edit_mask)[:, 1]
    return np.stack([15.0 * mean_brightness(edited), success], axis=-1).astype(np.float32)


def target_fidelity(edited, target, edit_mask, l1_scale: float = 0.1) -> np.ndarray:
    """float32 `[N]` in [0, 5]: 5 * (1 - clip(L1 / l1_scale, 0, 1)), L1 the mean absolute difference in [0, 1] units
    between the edit and the world's target inside the edit mask (5 where the mask is empty: an identity edit)."""
    from editing_jax.data.world import verifier

    outside = ~np.asarray(edit_mask, bool)  # [N, H, W]: the verifier's L1 is over the pixels outside its mask
    l1 = np.asarray([verifier.preservation_l1(e, t, o) for e, t, o in zip(edited, target, outside, strict=True)])
    return (5.0 * (1.0 - np.clip(l1 / l1_scale, 0.0, 1.0))).astype(np.float32)


def host_world_fidelity_reward(source, edited, target, source_scene, target_scene, edit_mask) -> np.ndarray:
    """float32 `[N, 2]`: (world reward + `target_fidelity`, in [0, 20]; verifier success).

    A diagnostic with privileged information (the world's target image, which real data lacks): it grades how close
    an edit comes to the right pixels inside the edit mask, finer than the verifier's pass / fail attribute checks,
    so it tells whether the RL fails for want of a finer reward signal.
    """
    world = host_world_reward(source, edited, target, source_scene, target_scene, edit_mask)
    fidelity = target_fidelity(edited, target, edit_mask)
    return np.stack([world[:, 0] + fidelity, world[:, 1]], axis=-1).astype(np.float32)


REWARD_FNS = {
    "world": host_world_reward,
    "brightness": host_brightness_reward,
    "world_fidelity": host_world_fidelity_reward,
}
REWARDS = tuple(REWARD_FNS)  # GRPOSettings.reward


# ---- the objective ---------------------------------------------------------------------------------------------


def velocity_fn(model: flow_edit.FlowEditor, params: PyTree, text, cond: jax.Array):
    """`(x [N, L, C], t []) -> v`: the editor's velocity for the N inputs encoded as `text` and `cond` `[N, L, C]`."""
    return lambda x, t: model.velocity(params, x, jnp.full((cond.shape[0],), t), text, cond)


def make_rollout_fn(model: flow_edit.FlowEditor, settings: GRPOSettings, reward_fn=host_world_reward):
    """`(policy, model_state, batch, rng) -> rollout`: steps 1-3 of the module docstring, without gradient.

    The rollout holds everything the policy loss reads, so it can be replayed for several updates: the inputs'
    encodings (`cond` `[N, L, C]`, `text`), the window (`start` int32, `x_start` `[N, L, C]`, `stored` and `noises`
    `[k, N, L, C]`, `times` `[k + 1]`), the behaviour policy's log-probs `old` `[k, N]`, and per sample `advantages`,
    `keep`, `rewards` and `success` `[N]`.
    """
    schedule = flow.timesteps(settings.num_steps, settings.shift)  # [S + 1]
    group, k = settings.group_size, settings.window

    def rollout(policy, model_state, batch, rng):
        policy = jax.lax.stop_gradient(policy)
        repeat = lambda x: jnp.repeat(x, group, axis=0)  # noqa: E731  [B, ...] -> [B * G, ...]
        source = repeat(batch["source_image"])
        cond = model.encode(model_state, source)  # [N, L, C]
        text = model.encode_text(policy, repeat(batch["text_ids"]), repeat(batch["text_mask"]))
        count = cond.shape[0]
        start_rng, noise_rng, sde_rng = jax.random.split(rng, 3)
        start = jax.random.randint(start_rng, (), 0, settings.last_window_start + 1)
        if settings.shared_initial_noise:  # a group's samples differ only by the window's noises
            x_T = repeat(jax.random.normal(noise_rng, (count // group, *cond.shape[1:]), jnp.float32))
        else:
            x_T = jax.random.normal(noise_rng, cond.shape, jnp.float32)  # [N, L, C]
        mask = flow.sde_window_mask(settings.num_steps, start, k)
        velocity = velocity_fn(model, policy, text, cond)
        x_0, trajectory, old_log_probs = flow.sample(velocity, x_T, timesteps=schedule, rng=sde_rng,
                                                     noise_level=settings.noise_level, sde_steps_mask=mask)  # fmt: skip
        edited = model.decode(model_state, x_0)  # [N, S, S, 3] uint8
        shape = jax.ShapeDtypeStruct((count, 2), jnp.float32)
        scores = jax.pure_callback(reward_fn, shape, source, edited, repeat(batch["target_image"]),
                                   repeat(batch["source_scene_bytes"]), repeat(batch["target_scene_bytes"]),
                                   repeat(batch["edit_mask"]))  # fmt: skip
        scores = jax.lax.stop_gradient(scores)  # [N, 2]: (reward, success)
        shaped = advantage_rewards(scores, settings.success_bonus).reshape(-1, group)  # [B, G]
        keep = mixed_outcome_mask(scores[:, 1].reshape(-1, group)) if settings.mixed_only else jnp.ones_like(shaped)
        advantages = compute_advantages(shaped, settings.advantage, settings.advantage_clip, keep=keep)
        keys = jax.random.split(sde_rng, settings.num_steps)
        noises = jax.vmap(lambda key: jax.random.normal(key, cond.shape, jnp.float32))(
            jax.lax.dynamic_slice_in_dim(keys, start, k, axis=0))  # fmt: skip
        return jax.lax.stop_gradient({
            "cond": cond,
            "text": text,
            "start": start,
            "x_start": trajectory[start],
            "stored": jax.lax.dynamic_slice_in_dim(trajectory, start + 1, k, axis=0),  # [k, N, L, C]
            "noises": noises,
            "times": jax.lax.dynamic_slice_in_dim(schedule, start, k + 1),  # [k + 1]
            "old": jax.lax.dynamic_slice_in_dim(old_log_probs, start, k, axis=0),  # [k, N]
            "advantages": advantages.reshape(-1),
            "keep": keep.reshape(-1),
            "rewards": scores[:, 0],
            "success": scores[:, 1],
        })  # fmt: skip

    return rollout


def rollout_buffer(model: flow_edit.FlowEditor, settings: GRPOSettings, policy, model_state, batch, rng) -> dict:
    """The model-state entry that replays a rollout `updates_per_rollout` times: zeros of its shapes, age 0.

    Per-sample arrays are annotated with the logical 'batch' axis, so on a mesh the buffer is sharded like the data.
    """
    abstract = jax.eval_shape(make_rollout_fn(model, settings), policy, model_state, batch, rng)

    def zeros(path, x):
        key = path[0].key
        sample_axis = None if key in ("start", "times") else 1 if key in ("stored", "noises", "old") else 0
        names = tuple("batch" if axis == sample_axis else None for axis in range(x.ndim))
        return nn.LogicallyPartitioned(jnp.zeros(x.shape, x.dtype), names)

    return {"data": jax.tree_util.tree_map_with_path(zeros, abstract), "age": jnp.zeros((), jnp.int32)}


def make_loss(model: flow_edit.FlowEditor, settings: GRPOSettings, reward_fn=host_world_reward):
    """`(params={'lora'}, model_state, batch, rng) -> (loss, LossAux)`; see the module docstring.

    With `updates_per_rollout` U > 1 the rollout lives in `model_state['rollout']`: every U-th step collects a new
    one (from this step's batch), the others replay it, so the ratios of steps 2..U are off-policy and the clip can
    bind.
    """
    collect = make_rollout_fn(model, settings, reward_fn)
    updates = settings.updates_per_rollout

    def loss(params, model_state, batch, rng):
        policy = editor_params(params, model_state)
        reference = editor_params(params, model_state, reference=True)
        if updates == 1:
            rollout = collect(policy, model_state, batch, rng)
        else:
            buffer = model_state["rollout"]
            rollout = jax.lax.cond(buffer["age"] % updates == 0,
                                   lambda: collect(policy, model_state, batch, rng),
                                   lambda: buffer["data"])  # fmt: skip
            model_state = {**model_state, "rollout": {"data": rollout, "age": buffer["age"] + 1}}
        cond, text = rollout["cond"], rollout["text"]
        advantages, keep = rollout["advantages"], rollout["keep"]  # [N], [N]
        new, kl = window_log_probs(velocity_fn(model, policy, text, cond), velocity_fn(model, reference, text, cond),
                                   rollout["x_start"], rollout["stored"],
                                   rollout["noises"], rollout["times"], settings.noise_level,
                                   dense=settings.algorithm == "dense_grpo", remat=settings.remat)  # fmt: skip
        log_ratio = new - rollout["old"]  # [k, N]
        if settings.algorithm == "dense_grpo":
            policy_loss = masked_mean(
                dense_surrogate(jnp.sum(log_ratio, axis=0), advantages, settings.clip_range), keep
            )
        else:
            per_sample = jnp.mean(ppo_surrogate(log_ratio, advantages[None], settings.clip_range), axis=0)  # [N]
            policy_loss = masked_mean(per_sample, keep)
        kl_loss = jnp.mean(kl)
        total = policy_loss + settings.kl_beta * kl_loss
        rewards = rollout["rewards"]
        metrics = {
            "loss": total,
            "policy_loss": policy_loss,
            "kl": kl_loss,
            "reward": jnp.mean(rewards),
            "reward_std": jnp.std(rewards),
            "success": jnp.mean(rollout["success"]),
            "kept_fraction": jnp.mean(keep),
            "log_ratio_abs": jnp.mean(jnp.abs(log_ratio)),
            "window_start": rollout["start"].astype(jnp.float32),
        }
        return total, LossAux(metrics=metrics, model_state=model_state)

    return loss


def prepare_batch(model: flow_edit.FlowEditor, batch: Batch) -> Batch:
    """Host-side: tokenized instruction plus the scene graphs as byte arrays for the in-graph reward."""
    batch = model.prepare_batch(batch)
    batch["source_scene_bytes"] = encode_strings(batch["source_scene"])
    batch["target_scene_bytes"] = encode_strings(batch["target_scene"])
    return batch


def editor_params(params: PyTree, model_state: PyTree, *, reference: bool = False) -> dict:
    """The flow editor's {'dit', 'text_encoder'} params of a GRPO run: the frozen base joined with its adapters
    (`reference`: zeroed, i.e. the SFT base)."""
    dit = policy_dit(params, model_state["base_dit"], reference=reference)
    return {"dit": dit, "text_encoder": model_state["text_encoder"]}


def make_objective(model: flow_edit.FlowEditor, sft_params: PyTree, sft_state: PyTree, settings: GRPOSettings,
                   eval_settings: flow_edit.FlowSettings, reward_fn=host_world_reward) -> Objective:  # fmt: skip
    """GRPO objective on top of an SFT run's params/state (`model.dit` must have `lora_rank > 0`)."""
    if model.dit.lora_rank <= 0:
        raise ValueError("GRPO trains LoRA adapters: set model.lora_rank > 0")
    edit_fn = flow_edit.make_edit_fn(model, eval_settings)

    def init(rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        fresh = flow_edit.make_objective(model, sft_state["tokenizer"], cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=eval_settings).init(rng, batch)  # fmt: skip
        dit = editmgt.replace_params(
            nn.meta.unbox(fresh["params"]["dit"]), sft_params["dit"]
        )  # base from SFT; adapters and token focus fresh (lora_b = 0, gates at gate_init)
        focus, dit = split_focus(dit)
        lora, base = split_lora(dit)
        trainable = {"lora": lora, "focus": focus} if focus else {"lora": lora}
        variables = {"params": trainable, "base_dit": base, "text_encoder": sft_params["text_encoder"],
                     "tokenizer": sft_state["tokenizer"], "latent_stats": sft_state["latent_stats"]}  # fmt: skip
        if settings.updates_per_rollout > 1:
            policy = editor_params(trainable, variables)
            variables["rollout"] = rollout_buffer(model, settings, policy, variables, batch, rng)
        return variables

    def visualize(params, model_state, batch):
        return flow_edit.visualize_edits(edit_fn, editor_params(params, model_state), model_state, batch, eval_settings)

    def evaluate(params, model_state, batches):
        result = flow_edit.evaluate_batches(edit_fn, editor_params(params, model_state), model_state, batches,
                                            eval_settings)  # fmt: skip
        return {"verifier_success": result["verifier_success"], "preservation_l1": result["preservation_l1"]}

    return Objective(name=settings.algorithm, init=init, loss=make_loss(model, settings, reward_fn),
                     visualize=visualize, evaluate=evaluate, prepare_batch=lambda b: prepare_batch(model, b))  # fmt: skip


def build_objective(config) -> Objective:
    """From `configs/cogniedit/grpo.py`: the SFT run at `config.init_from` provides the base, tokenizer and text."""
    from editing_jax.train import checkpoint

    if not config.init_from:
        raise ValueError("set init_from to a trained flow_edit SFT run (configs/cogniedit/sft.py)")
    sft = checkpoint.load_trained(config.init_from)
    if sft.config.method != "flow_edit":
        raise ValueError(f"init_from {config.init_from} is a {sft.config.method} run, expected flow_edit")
    with config.unlocked():  # The model must be the SFT run's; only the LoRA fields come from this config.
        for section in ("tokenizer", "text", "patch_size"):
            config[section] = sft.config[section]
        for key, value in sft.config.model.items():
            if key not in ("lora_rank", "lora_alpha", "lora_targets") and not key.startswith("token_focus_"):
                config.model[key] = value
    model = flow_edit.build_model(config)
    settings = GRPOSettings(**{k: v for k, v in config.grpo.items()})
    if settings.updates_per_rollout > 1 and int(config.train.grad_accum_steps) > 1:
        raise ValueError("grpo.updates_per_rollout > 1 replays one rollout per step: set train.grad_accum_steps=1")
    eval_settings = flow_edit.FlowSettings.from_config(config.sampling)
    return make_objective(
        model, sft.inference_params, sft.model_state, settings, eval_settings, reward_fn=REWARD_FNS[settings.reward]
    )
