"""Default trainer sections of a config (optimizer, train loop, mesh); method configs start from these."""

from __future__ import annotations

import ml_collections


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "name": "adamw",
            "learning_rate": 1e-3,
            "warmup_steps": 100,
            "decay": "cosine",
            "end_lr_fraction": 0.1,
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip_norm": 1.0,
            "lr_scales": "",  # 'group=scale,...': per top-level parameter group learning-rate multipliers
        }
    )
    config.update(overrides)
    return config


def train_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "num_steps": 1000,
            "grad_accum_steps": 1,
            "ema_decay": 0.0,  # 0 disables the EMA of params.
            "log_every": 50,
            "checkpoint_every": 500,
            "max_to_keep": 3,
            "async_checkpoint": True,
            "sample_every": 500,  # PNG grid of objective.visualize; 0 disables.
            "eval_every": 0,  # 0: evaluate only at the end.
            "max_consecutive_nonfinite": 10,
            "tensorboard": True,
        }
    )
    config.update(overrides)
    return config


def mesh_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    config.update(overrides)
    return config


def world_data_config(size: int, *, batch_size: int, num_eval_examples: int) -> ml_collections.ConfigDict:
    """The `data` section for training on the synthetic world (see editing_jax/train/data.py)."""
    return ml_collections.ConfigDict(
        {
            # 'world': generated on the fly; 'tfds': a dataset from `editing-jax data generate`; 'self_samples': an
            # editor's own accepted edits (`benchmarks/rejection_samples.py`, `editing_jax.data.self_samples`).
            "source": "world",
            "data_dir": "",  # Dataset directory for source='tfds', the .npz file for source='self_samples'.
            # source='self_samples': the share of training examples drawn from the file; the rest are world examples.
            "self_sample_fraction": 1.0,
            "size": size,
            "seed": 0,
            # Comma-separated subset of the world's edit types for source='world' ('' = all); `name:k` (or a type
            # named k times) is drawn k times as often.
            "edit_types": "",
            # source='world': where a count edit's target puts added copies and which it removes ('random' or
            # 'reading_order', data/world/edits.py WorldConfig.count_placement); val and test evaluation are unchanged.
            "count_placement": "random",
            # source='world', train split only: draw list of source-scene object counts, `n:k` drawn k times as often
            # ('1,2,3:2,4:2' doubles 3- and 4-object scenes; '' = uniform over 1..4 before the split's rejection).
            "object_counts": "",
            "num_train_examples": 100_000,
            "shuffle_seed": 0,
            "batch_size": batch_size,  # Global batch size.
            "eval_split": "val",
            "num_eval_examples": num_eval_examples,
            "eval_batch_size": 64,
        }
    )


def logical_axis_rules() -> tuple:
    """Logical axis name -> mesh axes (see editing_jax/train/sharding.py); a config may override any entry."""
    from editing_jax.train import sharding

    return sharding.DEFAULT_RULES
