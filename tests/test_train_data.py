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


def test_edit_types_select_a_subset_of_the_world():
    config = defaults.world_data_config(32, batch_size=8, num_eval_examples=8)
    assert len(train_data.world_edit_types(config)) == 10  # '' = every edit type
    config.edit_types = "color, remove"
    assert train_data.world_edit_types(config) == ("color", "remove")
    batch = next(iter(train_data.make_train_dataset(config)))
    assert set(batch["edit_type"]) <= {"color", "remove"}
    assert {t for b in train_data.make_eval_batches(config) for t in b["edit_type"]} <= {"color", "remove"}
    config.edit_types = "color:3, remove"
    assert train_data.world_edit_types(config) == ("color", "color", "color", "remove")
    config.edit_types = "color:0"
    with pytest.raises(ValueError, match="weight of 'color' must be a positive integer"):
        train_data.world_edit_types(config)
    config.edit_types = "colour"
    with pytest.raises(ValueError, match="edit_types must be a non-empty subset"):
        train_data.make_train_dataset(config)


def test_count_placement_reaches_the_train_world_only():
    config = defaults.world_data_config(32, batch_size=4, num_eval_examples=4)
    assert config.count_placement == "random"
    config.count_placement = "reading_order"
    assert train_data._source(config, "train", 8).config.count_placement == "reading_order"
    assert train_data._source(config, "val", 8).config.count_placement == "random"  # evaluation stays comparable
    config.source = "tfds"
    with pytest.raises(ValueError, match="count_placement applies to generated world data"):
        train_data.make_train_dataset(config)


def test_object_counts_reach_the_train_world_only():
    config = defaults.world_data_config(32, batch_size=4, num_eval_examples=4)
    assert train_data.world_object_counts(config) == ()  # '' = the world's own draw
    config.object_counts = "1, 3:2,4:3"
    assert train_data.world_object_counts(config) == (1, 3, 3, 4, 4, 4)
    assert train_data._source(config, "train", 8).config.object_counts == (1, 3, 3, 4, 4, 4)
    assert train_data._source(config, "val", 8).config.object_counts == ()  # evaluation stays comparable
    config.object_counts = "three"
    with pytest.raises(ValueError, match="expected object counts"):
        train_data.world_object_counts(config)
    config.object_counts = "3:0"
    with pytest.raises(ValueError, match="the weight of '3' must be a positive integer"):
        train_data.world_object_counts(config)
    config.object_counts = "4"
    config.source = "tfds"
    with pytest.raises(ValueError, match="object_counts applies to generated world data"):
        train_data.make_train_dataset(config)
