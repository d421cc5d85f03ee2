"""Training data from config: on-the-fly world and prepared tfds datasets give the same batches."""

import numpy as np
import pytest

from editing_jax.data import tfds_world
from editing_jax.train import data as train_data
from editing_jax.train import defaults


def test_world_and_tfds_sources_give_identical_batches(tmp_path):
    config = defaults.world_data_config(32, batch_size=4, num_eval_examples=6)
    with config.unlocked():
        config.num_train_examples = 12
    on_the_fly = next(iter(train_data.make_train_dataset(config)))
    dataset_dir = tfds_world.prepare_world_dataset(
        tmp_path, split_sizes={"train": 12, "val": 6}, size=32, seed=0, show_progress=False
    )
    with config.unlocked():
        config.source = "tfds"
        config.data_dir = str(dataset_dir)
    prepared = next(iter(train_data.make_train_dataset(config)))
    np.testing.assert_array_equal(on_the_fly["target_image"], prepared["target_image"])
    assert list(on_the_fly["instruction"]) == list(prepared["instruction"])
    eval_batches = train_data.make_eval_batches(config)
    assert sum(len(b["instruction"]) for b in eval_batches) == 6  # No example dropped from evaluation.


def test_unknown_source_is_an_error():
    config = defaults.world_data_config(32, batch_size=4, num_eval_examples=0)
    with config.unlocked():
        config.source = "hub"
    with pytest.raises(ValueError, match="unknown data.source 'hub'"):
        train_data.make_train_dataset(config)
    assert train_data.make_eval_batches(config) == []
