"""Training and evaluation data from a config's `data` section (the synthetic world, on the fly or prepared, or an
editor's own accepted edits of it: `data.source=self_samples`, see `editing_jax.data.self_samples`)."""

from __future__ import annotations

import jax

from editing_jax.data import pipeline
from editing_jax.data.world import edits


def _draw_list(data_config, option: str) -> list[str]:
    """`data.<option>` as a draw list: comma-separated items, each optionally `item:k` (listed k times)."""
    items = []
    for entry in str(data_config.get(option, "")).split(","):
        item, _, weight = entry.strip().partition(":")
        if not item:
            continue
        if weight and not (weight.isdigit() and int(weight) > 0):
            raise ValueError(f"data.{option}: the weight of {item!r} must be a positive integer, got {weight!r}")
        items.extend([item] * (int(weight) if weight else 1))
    return items


def world_edit_types(data_config) -> tuple[str, ...]:
    """The `data.edit_types` draw list: comma-separated names, each optionally `name:k` (drawn k times as often).

    '' or absent = every edit type of the world, uniformly. The world draws uniformly from the returned tuple, so
    `color:3,remove` yields ('color', 'color', 'color', 'remove'): three recolors for every removal.
    """
    return tuple(_draw_list(data_config, "edit_types")) or edits.WorldConfig().edit_types


def world_object_counts(data_config) -> tuple[int, ...]:
    """The `data.object_counts` draw list of source-scene object counts, e.g. '1,2,3:2,4:2' -> (1, 2, 3, 3, 4, 4).

    '' or absent = () (the world's own uniform draw). Applies to the train split only (`_source`).
    """
    counts = _draw_list(data_config, "object_counts")
    if not all(count.isdigit() for count in counts):
        raise ValueError(f"data.object_counts: expected object counts like '1,2,3:2,4:2', got {counts}")
    return tuple(int(count) for count in counts)


def _source(data_config, split: str, num_examples: int):
    placement = str(data_config.get("count_placement", "random"))
    object_counts = world_object_counts(data_config)
    if data_config.source == "tfds":
        for option, changed in (("count_placement", placement != "random"), ("object_counts", bool(object_counts))):
            if changed:
                raise ValueError(f"data.{option} applies to generated world data (source='world' or 'self_samples'); "
                                 "a tfds dataset keeps the scenes it was generated with")  # fmt: skip
        from editing_jax.data import tfds_world

        return tfds_world.load_world_source(data_config.data_dir, split)
    if data_config.source not in ("world", "self_samples"):
        raise ValueError(f"unknown data.source {data_config.source!r}; valid: world, tfds, self_samples")
    train = split == "train"  # count placement and object counts shape training only: evaluation stays comparable
    world = edits.WorldConfig(size=int(data_config.size), edit_types=world_edit_types(data_config),
                              count_placement=placement if train else "random",
                              object_counts=object_counts if train else ())  # fmt: skip
    world_source = pipeline.WorldSource(split, num_examples, int(data_config.seed), world)
    if data_config.source == "world" or not train:  # a self-sample run evaluates on the world
        return world_source
    from editing_jax.data import self_samples

    own = self_samples.load_self_sample_source(data_config.data_dir, int(data_config.size))
    fraction = float(data_config.get("self_sample_fraction", 1.0))
    if fraction == 1.0:
        return own
    return self_samples.MixedSource(own, world_source, fraction, seed=int(data_config.shuffle_seed))


def make_train_dataset(data_config, prepare=None):
    """Infinite, shuffled, host-sharded batches of `batch_size / process_count` examples.

    `prepare` (an objective's `prepare_batch`) maps each host batch; it is stateless, so iterator checkpoints are
    unaffected.
    """
    process_count = jax.process_count()
    if data_config.batch_size % process_count:
        raise ValueError(f"batch_size {data_config.batch_size} is not divisible by {process_count} processes")
    dataset = pipeline.make_dataset(
        _source(data_config, "train", int(data_config.num_train_examples)),
        batch_size=int(data_config.batch_size) // process_count,
        seed=int(data_config.shuffle_seed),
        shuffle=True,
        num_epochs=None,
        shard_index=jax.process_index(),
        shard_count=process_count,
    )
    return dataset.map(prepare) if prepare is not None else dataset


def make_eval_batches(data_config, prepare=None) -> list[dict]:
    """Host batches of the eval split (not sharded: evaluation runs on every host's full copy), mapped by `prepare`."""
    num = int(data_config.num_eval_examples)
    if num <= 0:
        return []
    dataset = pipeline.make_dataset(
        _source(data_config, data_config.eval_split, num),
        batch_size=min(int(data_config.eval_batch_size), num),
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    return [prepare(batch) if prepare is not None else batch for batch in dataset]
