"""Tests for editing_jax.data.tfds_world: prepare offline without TF, read back bit-exactly."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from editing_jax.data import tfds_world
from editing_jax.data.world import edits, spec

SIZE = 32
SEED = 5
SPLIT_SIZES = {"train": 8, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    path = tfds_world.prepare_world_dataset(
        data_dir, split_sizes=SPLIT_SIZES, size=SIZE, seed=SEED, show_progress=False
    )
    return data_dir, path


def assert_example_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert isinstance(got[key], np.ndarray), key
            assert got[key].dtype == value.dtype, key
            assert got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert type(got[key]) is str, key
            assert got[key] == value, key


def test_no_tensorflow_involved(prepared):
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split", edits.SPLITS)
def test_read_back_equals_generator(prepared, split):
    _, path = prepared
    source = tfds_world.load_world_source(path, split)
    assert len(source) == SPLIT_SIZES[split]
    config = edits.WorldConfig(size=SIZE)
    for index in range(len(source)):
        want = edits.generate_sample(split, SEED, index, config).to_example()
        assert_example_equal(source[index], want)
    # Batched access (used by grain) agrees with single access.
    batch = source.__getitems__([3, 0])
    assert_example_equal(batch[0], source[3])
    assert_example_equal(batch[1], source[0])
    with pytest.raises(IndexError):
        source[len(source)]


def test_dataset_dir_layout_and_builder_from_directory(prepared):
    data_dir, path = prepared
    name = tfds_world.config_name(SIZE, SEED, SPLIT_SIZES)
    assert name == "size32_seed5_train8_val4_test4"
    assert path == data_dir / "editing_world" / name / "1.0.0"
    assert (path / "dataset_info.json").is_file()
    assert len(list(path.glob("*.array_record-*"))) == 3

    builder = tfds.builder_from_directory(str(path))
    assert builder.info.name == "editing_world"
    assert str(builder.info.version) == "1.0.0"
    assert {s: builder.info.splits[s].num_examples for s in edits.SPLITS} == SPLIT_SIZES
    assert builder.info.features["source_image"].shape == (SIZE, SIZE, 3)
    assert builder.info.features["edit_type"].names == list(spec.EDIT_TYPES)
    metadata = tfds_world.load_world_source(path, "val").metadata
    assert metadata == {"size": SIZE, "seed": SEED, "split_sizes": SPLIT_SIZES}
    assert json.loads((path / "metadata.json").read_text())["seed"] == SEED


def test_prepare_again_reuses(prepared):
    data_dir, path = prepared
    record = next(path.glob("*train.array_record-*"))
    before = record.stat().st_mtime_ns
    again = tfds_world.prepare_world_dataset(
        data_dir, split_sizes=SPLIT_SIZES, size=SIZE, seed=SEED, show_progress=False
    )
    assert again == path
    assert record.stat().st_mtime_ns == before


def test_configs_do_not_collide(prepared):
    data_dir, path = prepared
    names = {
        tfds_world.config_name(SIZE, SEED, SPLIT_SIZES),
        tfds_world.config_name(SIZE + 8, SEED, SPLIT_SIZES),
        tfds_world.config_name(SIZE, SEED + 1, SPLIT_SIZES),
        tfds_world.config_name(SIZE, SEED, {"train": 9, "val": 4, "test": 4}),
        tfds_world.config_name(SIZE, SEED, {"train": 8, "val": 4}),
    }
    assert len(names) == 5

    other = tfds_world.prepare_world_dataset(
        data_dir, split_sizes={"train": 3}, size=SIZE, seed=SEED + 1, show_progress=False
    )
    assert other != path and other.parent.name == "size32_seed6_train3_val0_test0"
    source = tfds_world.load_world_source(other, "train")
    assert len(source) == 3
    want = edits.generate_sample("train", SEED + 1, 2, edits.WorldConfig(size=SIZE))
    assert_example_equal(source[2], want.to_example())
    original = tfds_world.load_world_source(path, "train")
    assert source[0]["source_scene"] != original[0]["source_scene"]
    with pytest.raises(ValueError, match="no split 'val'"):
        tfds_world.load_world_source(other, "val")


def test_quiet_unless_show_progress(tmp_path, capfd):
    tfds_world.prepare_world_dataset(tmp_path, split_sizes={"val": 2}, size=SIZE, seed=0, show_progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    tfds_world.prepare_world_dataset(tmp_path, split_sizes={"test": 2}, size=SIZE, seed=0, show_progress=True)
    out, _ = capfd.readouterr()
    assert "editing_world" in out  # tfds' "Downloading and preparing ..." banner.


@pytest.mark.parametrize(
    "split_sizes, size, seed, match",
    [
        ({"training": 2}, 32, 0, "unknown splits"),
        ({"train": 0}, 32, 0, "at least one split"),
        ({"train": -1}, 32, 0, ">= 0"),
        ({"train": 2}, 8, 0, "at least 24"),
        ({"train": 2}, 32, -1, "seed"),
    ],
)
def test_prepare_rejects_bad_arguments(tmp_path, split_sizes, size, seed, match):
    with pytest.raises(ValueError, match=match):
        tfds_world.prepare_world_dataset(tmp_path, split_sizes=split_sizes, size=size, seed=seed, show_progress=False)
    assert not any(tmp_path.iterdir())


def test_load_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        tfds_world.load_world_source(tmp_path / "nope", "train")
