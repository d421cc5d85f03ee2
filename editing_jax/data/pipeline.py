"""grain input pipelines: on-the-fly world sources, collation, sharded deterministic datasets.

A pipeline is ``source -> host shard -> shuffle -> repeat -> map -> batch`` built from grain's
``MapDataset`` and turned into an ``IterDataset`` at the end. Every stage before batching works
on element indices, so the whole pipeline is a pure function of ``(source, seed, shard, step)``:
its iterator state is a small JSON dict (``{"next_index": n}`` without worker processes) that the
trainer stores in its checkpoint and restores with :func:`restore_iterator`.

Any random-access source works (``len`` and ``__getitem__``): :class:`WorldSource`, the prepared
tfds dataset from :func:`editing_jax.data.tfds_world.load_world_source`, or
:class:`editing_jax.data.manifest.ManifestSource`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from editing_jax.data.world import edits

__all__ = [
    "WorldSource",
    "collate",
    "iterator_state",
    "make_dataset",
    "restore_iterator",
]

Example = dict[str, Any]


class WorldSource:
    """grain random-access source that renders world samples on demand.

    Element ``i`` is ``edits.generate_sample(split, seed, i, config).to_example()``, so the source
    holds no data, pickles to a few bytes (for grain worker processes) and equals a tfds dataset
    prepared with the same ``(split, seed, size)`` element for element.

    Args:
        split: One of ``edits.SPLITS``.
        num_examples: Length of the source (examples ``0 .. num_examples - 1``).
        seed: World seed.
        config: Generator options (default ``WorldConfig()``, 64 px).
    """

    def __init__(
        self,
        split: str,
        num_examples: int,
        seed: int,
        config: edits.WorldConfig | None = None,
    ):
        if split not in edits.SPLITS:
            raise ValueError(f"split must be one of {edits.SPLITS}, got {split!r}")
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        self.split = split
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.config = edits.WorldConfig() if config is None else config

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for WorldSource of {self.num_examples}")
        return edits.generate_sample(self.split, self.seed, index, self.config).to_example()

    def __repr__(self) -> str:
        return (
            f"WorldSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"seed={self.seed}, size={self.config.size})"
        )


def collate(examples: Sequence[Mapping[str, Any]]) -> Example:
    """Stacks a list of examples into a batch.

    Strings (``str`` or ``bytes``) become a NumPy array of ``dtype=object`` holding the Python
    objects, shape ``[B]``: it slices and indexes like the other fields, and a trainer drops it
    (or tokenizes it) before sending the batch to devices. Everything else goes through
    ``np.stack``, e.g. images ``[S, S, 3]`` -> ``[B, S, S, 3]``, scalars -> ``[B]``.

    Args:
        examples: Non-empty sequence of dicts with the same keys.

    Returns:
        A dict with the same keys, each value with a new leading batch dimension of size B.

    Raises:
        ValueError: ``examples`` is empty, keys differ between examples, or a field has
            inconsistent shapes.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    keys = list(examples[0].keys())
    for i, example in enumerate(examples[1:], start=1):
        if set(example.keys()) != set(keys):
            raise ValueError(f"collate: example {i} has keys {sorted(example.keys())}, example 0 has {sorted(keys)}")
    batch: Example = {}
    for key in keys:
        values = [example[key] for example in examples]
        if all(isinstance(v, str | bytes) for v in values):
            strings = np.empty(len(values), dtype=object)  # [B]
            strings[:] = values
            batch[key] = strings
            continue
        try:
            batch[key] = np.stack([np.asarray(v) for v in values])  # [B, ...]
        except ValueError as e:
            shapes = sorted({np.shape(v) for v in values})
            raise ValueError(f"collate: field {key!r} has inconsistent shapes {shapes}") from e
    return batch


def _shuffle_seed(seed: int) -> int:
    """Mixes the user seed into a 32-bit shuffle seed.

    grain reshuffles epoch ``e`` with seed ``seed + e``; mixing first keeps seed ``s`` epoch 1
    from replaying seed ``s + 1`` epoch 0.
    """
    return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1, dtype=np.uint32)[0])


def _ensure_absl_flags_parsed() -> None:
    """grain worker processes read absl flags; outside an absl app they are not parsed yet."""
    if not flags.FLAGS.is_parsed():
        logging.getLogger(__name__).info("absl flags not parsed; using defaults for grain")
        flags.FLAGS.mark_as_parsed()


def make_dataset(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    map_fn: Callable[[Example], Example] | grain.transforms.RandomMap | None = None,
    num_workers: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Builds a deterministic, checkpointable, host-sharded batch pipeline.

    Host ``shard_index`` of ``shard_count`` reads elements ``shard_index, shard_index +
    shard_count, ...`` of ``source``: shards are disjoint, cover the source, and differ in
    length by at most one. Each epoch is a fresh permutation of the shard (different for every
    epoch and seed). Batches are cut from the concatenated epochs, so with ``num_epochs=None``
    a batch may straddle an epoch boundary.

    Args:
        source: Random-access source (``len`` and ``__getitem__`` returning example dicts).
        batch_size: Examples per batch (per host).
        seed: Seed of the shuffle and of ``map_fn`` when it is a ``grain.transforms.RandomMap``.
        shuffle: Whether to permute each epoch.
        num_epochs: Passes over the shard; ``None`` repeats forever.
        shard_index: This host's shard, in ``[0, shard_count)``.
        shard_count: Number of hosts reading disjoint shards.
        drop_remainder: Drop the last incomplete batch (only matters for finite epochs).
        map_fn: Per-example transform applied before batching: a callable, or a
            ``grain.transforms.Map`` / ``RandomMap`` (the latter gets a per-element rng derived
            from ``seed``).
        num_workers: grain worker processes (``mp_prefetch``); 0 reads in this process with
            threads. Output and state restoration are deterministic for a fixed value.
        read_options: Threading/prefetch options of ``to_iter_dataset`` (grain defaults if
            None).

    Returns:
        A ``grain.IterDataset`` of :func:`collate`-d batches.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}"
        )
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if len(source) < shard_count:
        raise ValueError(f"source has {len(source)} examples, fewer than shard_count={shard_count}")

    ds = grain.MapDataset.source(source)
    ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=_shuffle_seed(seed))
    ds = ds.repeat(num_epochs)
    if isinstance(map_fn, grain.transforms.RandomMap):
        ds = ds.random_map(map_fn, seed=_shuffle_seed(seed + 1))
    elif map_fn is not None:
        ds = ds.map(map_fn)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    iter_ds = ds.to_iter_dataset(read_options)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter_ds


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Returns the iterator's position as a JSON-serializable dict (a deep copy).

    Raises:
        TypeError: grain returned a state that JSON cannot hold.
    """
    state = iterator.get_state()
    try:
        return json.loads(json.dumps(state))
    except TypeError as e:
        raise TypeError(f"grain iterator state is not JSON-serializable: {state!r}") from e


def restore_iterator(dataset: grain.IterDataset, state: Mapping[str, Any] | str | bytes) -> grain.DatasetIterator:
    """Returns a new iterator over ``dataset`` positioned at a saved state.

    Args:
        dataset: The pipeline, rebuilt with the same arguments as the one the state came from.
        state: A dict from :func:`iterator_state`, or its JSON encoding (str or bytes).

    Returns:
        An iterator whose next batches equal those the saved iterator would have produced.
    """
    if isinstance(state, str | bytes):
        state = json.loads(state)
    iterator = iter(dataset)
    iterator.set_state(dict(state))
    return iterator
