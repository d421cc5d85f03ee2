"""editing-jax train --config configs/cogniedit/dense_grpo.py --workdir workdir/cogniedit_dense32 --config.init_from=workdir/cogniedit_sft32

CogniEdit's Dense GRPO (eqs. 7-9, Algorithm 1): as `configs/cogniedit/grpo.py`, but the k-step SDE window is
re-simulated with gradient through the trajectory and its log-ratio is summed and clipped (editing_jax/methods/grpo.py).

Variants: `tiny` (a CI-sized schedule), `focus` (with Dynamic Token Focus Relocation, as in grpo.py).
"""

from editing_jax.methods.grpo_configs import grpo_config

VARIANTS = ("", "tiny", "focus", "tiny,focus")


def get_config(arg=None):
    return grpo_config(arg, "dense_grpo")
