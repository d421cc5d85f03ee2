"""editing-jax train --config configs/editmgt/edit.py:size=32 --workdir workdir/editmgt32

EditMGT edit fine-tuning on (source, instruction, target) triplets: the source image's tokens condition the MGT
(EditMGT's C_V). Needs a trained VQ run at `tokenizer.checkpoint` (default workdir/vq{size}); set `init_from` to a
text-to-image run (configs/editmgt/t2i.py) to start from pretrained weights.

Variants (comma-separated): `size=32|64`; `quick` the quickstart's shorter schedule; `long` the quick model grounded,
with 2 + 2 blocks, trained for 48,000 steps, ~2 h on the 2 cores of a Zen 4 EPYC (the best measured EditMGT recipe);
`tiny` a CI-sized model.
"""

from editing_jax.methods.editmgt_configs import editmgt_config

VARIANTS = ("size=32", "size=64", "size=32,quick", "size=32,long", "size=32,tiny")


def get_config(arg=None):
    return editmgt_config(arg, stage="edit")
