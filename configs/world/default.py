"""editing-jax data generate --config configs/world/default.py:size=32 --split train --num 256 --out /tmp/world32

The synthetic fine-grained editing world, the embedded default dataset of every method.

Variants: `size=N` sets the canvas size in pixels (default 64; 32 for quick CPU runs).
"""

import ml_collections

from editing_jax import config_lib
from editing_jax.data.world import spec

VARIANTS = ("size=32", "size=64")


def get_config(arg=None):
    args = config_lib.parse_config_arg(arg, allowed=("size",))
    config = ml_collections.ConfigDict()
    config.size = int(args.get("size", 64))
    config.seed = 0
    config.min_objects = 1
    config.max_objects = spec.MAX_OBJECTS
    config.edit_types = spec.EDIT_TYPES
    return config
