"""editing-jax data generate --config configs/world/default.py:size=32 --split train --num 256 --out /tmp/world32

The synthetic fine-grained editing world, the embedded default dataset of every method.

Variants: `size=N` sets the canvas size in pixels (default 64; 32 for quick CPU runs).
"""

import ml_collections

from editing_jax import config_lib

VARIANTS = ("size=32", "size=64")


def get_config(arg=None):
    args = config_lib.parse_config_arg(arg, allowed=("size",))
    config = ml_collections.ConfigDict()
    config.size = int(args.get("size", 64))
    config.seed = 0
    return config
