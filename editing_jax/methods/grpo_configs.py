"""Config builder shared by `configs/cogniedit/grpo.py` and `configs/cogniedit/dense_grpo.py`."""

from __future__ import annotations

import ml_collections

from editing_jax import config_lib
from editing_jax.nn.transformer import DEFAULT_LORA_TARGETS
from editing_jax.train import defaults


def grpo_config(arg: str | None, algorithm: str) -> ml_collections.ConfigDict:
    """GRPO config for `algorithm` ('grpo' or 'dense_grpo') with the variants `tiny` and `focus` (token focus on)."""
    args = config_lib.parse_config_arg(arg, allowed=("tiny", "focus"))
    tiny = bool(args.get("tiny", False))
    focus = bool(args.get("focus", False))
    config = ml_collections.ConfigDict()
    config.method = "flow_grpo"
    config.seed = 0
    config.init_from = ""  # The flow_edit SFT run: base DiT, text encoder, autoencoder and latent statistics.
    # Copied from the SFT run when training starts (they must match its weights).
    config.patch_size = 2
    config.tokenizer = ml_collections.ConfigDict({"checkpoint": "", "model_json": ""})
    config.text = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        {
            "lora_rank": 4,  # CogniEdit: rank 4, alpha 4
            "lora_alpha": 4.0,
            # Block Dense layers that get adapters (CogniEdit: attention projections); add 'proj', 'net_2',
            # 'proj_mlp', 'proj_out' for the MLPs and the single blocks' output.
            "lora_targets": DEFAULT_LORA_TARGETS,
            # Dynamic Token Focus Relocation (models/token_focus.py), trained with the adapters; 0 tokens = off.
            "token_focus_tokens": 4 if focus else 0,
            "token_focus_layers": (),  # () = every block
            "token_focus_relaxation": "straight_through",
            "token_focus_temperature": 1.0,
            "token_focus_gate_init": 0.0,  # 0: the policy starts at the SFT base; 1: the paper's hard replacement
        }
    )
    config.grpo = ml_collections.ConfigDict(
        {
            "algorithm": algorithm,
            "group_size": 4,
            "window": 2 if tiny else 5,  # k consecutive SDE steps (CogniEdit: 5)
            "num_steps": 4 if tiny else 10,
            "shift": 1.0,
            "noise_level": 0.7,
            "clip_range": 0.2,
            "advantage": "batch",
            "advantage_clip": 5.0,
            "kl_beta": 0.01,
            "remat": True,
            # Added to the reward of a verifier success before the advantages (0 = CogniEdit's reward only).
            "success_bonus": 0.0,
            # Advantages only for groups whose verifier outcomes differ; the others are left out of the policy loss.
            "mixed_only": False,
            # Policy updates per rollout (PPO epochs): a rollout is collected every this many steps and replayed in
            # between, so the later updates are off-policy and the clip can bind (1 = CogniEdit: every step on-policy).
            "updates_per_rollout": 1,
            # 'world': the verifier's alignment + coherence + consistency (CogniEdit's eq. 12); 'brightness': a
            # sanity check of the RL machinery (mean brightness of the edit; success is still the verifier's);
            # 'world_fidelity': 'world' plus closeness to the world's target image inside the edit mask (a
            # diagnostic with privileged information, see grpo.host_world_fidelity_reward).
            "reward": "world",
            # The G samples of an input start from the same noise, so their outcomes differ only through the SDE
            # window (the steps the loss credits); False = independent noises (Flow-GRPO, CogniEdit).
            "shared_initial_noise": False,
            # The window's start r is drawn from [0, min(this, num_steps - window)]: -1 = any start (CogniEdit),
            # 0 = always the first, highest-noise steps, where the edit's layout is chosen.
            "window_start_max": -1,
        }
    )
    config.sampling = ml_collections.ConfigDict({"num_steps": 4 if tiny else 20, "guidance_scale": 0.0, "shift": 1.0})
    config.data = defaults.world_data_config(32, batch_size=2 if tiny else 8, num_eval_examples=8 if tiny else 128)
    config.optimizer = defaults.optimizer_config(learning_rate=1e-4, warmup_steps=2 if tiny else 20,
                                                 weight_decay=0.0)  # fmt: skip
    config.train = defaults.train_config(
        num_steps=4 if tiny else 300,
        log_every=2 if tiny else 10,
        checkpoint_every=4 if tiny else 100,
        sample_every=4 if tiny else 100,
        eval_every=0,
    )
    config.mesh = defaults.mesh_config()
    config.logical_axis_rules = defaults.logical_axis_rules()
    return config
