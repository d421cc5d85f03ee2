"""editing-jax train --config configs/cogniedit/sft.py:size=32 --workdir workdir/cogniedit_sft32

CogniEdit's base editor: supervised flow matching of the Flux/Kontext-style DiT on (source, instruction, target)
world triplets, in the latent space of a frozen KL autoencoder (`tokenizer.checkpoint`, a
`configs/tokenizer/kl.py` run); the source latents are reference tokens. GRPO / Dense GRPO start from this run.

Variants (comma-separated): `size=32`; `tiny` a CI-sized model and a few steps.
"""

import ml_collections

from editing_jax import config_lib
from editing_jax.methods.editmgt_configs import text_config
from editing_jax.train import defaults

VARIANTS = ("size=32", "size=32,tiny")


def get_config(arg=None):
    args = config_lib.parse_config_arg(arg, allowed=("size", "tiny"))
    size = int(args.get("size", 32))
    tiny = bool(args.get("tiny", False))
    if size != 32:
        raise config_lib.ConfigError(f"only size=32 has a tuned config so far, got {size}")

    config = ml_collections.ConfigDict()
    config.method = "flow_edit"
    config.seed = 0
    config.init_from = ""  # A previous flow_edit run whose params initialize this one.
    config.patch_size = 2  # Latent patch per DiT token (Flux: 2).
    config.tokenizer = ml_collections.ConfigDict(
        {
            "checkpoint": f"workdir/kl{size}",  # A trained KL autoencoder run (configs/tokenizer/kl.py).
            "model_json": "",  # Filled from the tokenizer run when training starts; travels with checkpoints.
        }
    )
    config.text = text_config(tiny)
    heads, head_dim = (2, 16) if tiny else (4, 32)
    config.model = ml_collections.ConfigDict(
        {
            "num_layers": 1 if tiny else 2,
            "num_single_layers": 1 if tiny else 2,
            "num_heads": heads,
            "head_dim": head_dim,
            "axes_dims_rope": (4, 6, 6) if tiny else (8, 12, 12),
            "rope_theta": 10.0,  # A 4x4 token grid: a small base separates neighbours (Flux: 10000).
            "mlp_ratio": 4.0,
            "zero_init_modulation": True,
            "zero_init_output": True,
            # Image tokens also read the text per token, with their gates supervised by the world's edit mask
            # (loss.text_gate_weight): 16.0 % held-out vs 12.9 % without (docs/RESULTS.md, CogniEdit: SFT base).
            "text_cross_attention": True,  # not in Flux; see FlowDiT.text_cross_attention
            "text_cross_source": False,  # not in Flux; see FlowDiT.text_cross_source
            "text_velocity": False,  # not in Flux; see FlowDiT.text_velocity
            "lora_rank": 0,  # Full fine-tuning here; GRPO adds LoRA adapters on top of this run.
            "dtype": "float32",
            "param_dtype": "float32",
        }
    )
    # text_gate_weight: weight of the per-token "is this cell edited" loss on the gates of model.text_cross_attention.
    # edit_weight: weight of the velocity error of tokens whose cell holds an edited pixel (1 = plain flow matching).
    config.loss = ml_collections.ConfigDict(
        {"cfg_dropout": 0.1, "timestep_sampling": "logit_normal", "text_gate_weight": 1.0, "edit_weight": 1.0}
    )
    config.sampling = ml_collections.ConfigDict({"num_steps": 4 if tiny else 20, "guidance_scale": 0.0, "shift": 1.0})
    config.data = defaults.world_data_config(size, batch_size=4 if tiny else 32, num_eval_examples=8 if tiny else 256)
    config.optimizer = defaults.optimizer_config(learning_rate=1e-3, warmup_steps=5 if tiny else 100,
                                                 weight_decay=0.01)  # fmt: skip
    config.train = defaults.train_config(
        num_steps=10 if tiny else 4000,
        log_every=5 if tiny else 50,
        checkpoint_every=10 if tiny else 500,
        sample_every=10 if tiny else 1000,
        eval_every=0,
    )
    config.mesh = defaults.mesh_config()
    config.logical_axis_rules = defaults.logical_axis_rules()
    return config
