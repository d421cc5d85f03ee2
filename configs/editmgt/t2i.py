"""editing-jax train --config configs/editmgt/t2i.py:size=32 --workdir workdir/editmgt32_t2i

EditMGT stage 1: text-to-image pretraining of the MGT on the world's target captions (no condition tokens).
Continue with configs/editmgt/edit.py and `--config.init_from=workdir/editmgt32_t2i`.

Variants (comma-separated): `size=32|64`; `quick` a shorter schedule; `tiny` a CI-sized model.
"""

from editing_jax.methods.editmgt_configs import editmgt_config

VARIANTS = ("size=32", "size=64", "size=32,quick", "size=32,tiny")


def get_config(arg=None):
    return editmgt_config(arg, stage="t2i")
