"""editing-jax train --config configs/cogniedit/grpo.py --workdir workdir/cogniedit_grpo32 --config.init_from=workdir/cogniedit_sft32

Flow-GRPO on the flow editor: LoRA adapters on a frozen SFT run (`init_from`), on-policy rollouts with an SDE window,
world reward (alignment + coherence + consistency), batch-level advantages, per-step clipped ratios and a KL to the
SFT base. `configs/cogniedit/dense_grpo.py` is the same with CogniEdit's Dense GRPO loss.

Variants: `tiny` (a CI-sized schedule; the model is the SFT run's), `focus` (CogniEdit's Dynamic Token Focus
Relocation, `models/token_focus.py`, trained with the adapters).
"""

from editing_jax.methods.grpo_configs import grpo_config

VARIANTS = ("", "tiny", "focus", "tiny,focus")


def get_config(arg=None):
    return grpo_config(arg, "grpo")
