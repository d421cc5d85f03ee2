"""Self-sample files: an editor's accepted edits of world examples as a training source."""

import numpy as np
import pytest

from editing_jax.data import pipeline, self_samples
from editing_jax.data.world import edits
from editing_jax.train import data as train_data
from editing_jax.train import defaults

ALL_TYPES = edits.WorldConfig().edit_types


def _world(num: int = 8) -> pipeline.WorldSource:
    return pipeline.WorldSource("train", num, 0, edits.WorldConfig(size=32))


def _save(path, indices, images=None):
    return self_samples.save_self_samples(path, split="train", world_seed=0, size=32, edit_types=ALL_TYPES,
                                          indices=np.asarray(indices), target_images=images, info={"k": 4})  # fmt: skip


def test_own_targets_replace_the_world_target_and_nothing_else(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    source = self_samples.SelfSampleSource(_save(tmp_path / "own.npz", [5, 2], images))
    assert len(source) == 2 and source.own_targets and source.metadata["info"] == {"k": 4}
    world = _world()
    for i, index in enumerate([5, 2]):
        expected, got = world[index], source[i]
        np.testing.assert_array_equal(got["target_image"], images[i])
        assert not np.array_equal(expected["target_image"], images[i])
        for key in expected:
            if key != "target_image":
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
    with pytest.raises(IndexError):
        source[2]


def test_a_file_without_images_keeps_the_world_targets(tmp_path):
    source = self_samples.SelfSampleSource(_save(tmp_path / "world.npz", [3]))
    assert not source.own_targets
    np.testing.assert_array_equal(source[0]["target_image"], _world()[3]["target_image"])


def test_bad_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="must not repeat"):
        _save(tmp_path / "a.npz", [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        _save(tmp_path / "a.npz", [])
    with pytest.raises(ValueError, match=r"uint8 \(1, 32, 32, 3\)"):
        _save(tmp_path / "a.npz", [1], np.zeros((1, 16, 16, 3), np.uint8))
    assert not list(tmp_path.iterdir())  # nothing half-written
    path = _save(tmp_path / "ok.npz", [1])
    with pytest.raises(ValueError, match="self samples of size 32, the config has data.size=64"):
        self_samples.load_self_sample_source(path, 64)
    np.savez(tmp_path / "other.npz", metadata=np.asarray('{"format": "x"}'), indices=np.arange(2))
    with pytest.raises(ValueError, match="not a self-sample file"):
        self_samples.SelfSampleSource(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        self_samples.SelfSampleSource(tmp_path / "missing.npz")


def test_training_reads_the_self_samples_and_evaluation_the_world(tmp_path):
    images = np.full((3, 32, 32, 3), 7, np.uint8)
    config = defaults.world_data_config(32, batch_size=3, num_eval_examples=4)
    with config.unlocked():
        config.source = "self_samples"
        config.data_dir = str(_save(tmp_path / "own.npz", [0, 4, 6], images))
    batch = next(iter(train_data.make_train_dataset(config)))
    assert (batch["target_image"] == 7).all()  # every row is one of the three own targets
    assert sorted(batch["instruction"]) == sorted(_world()[i]["instruction"] for i in (0, 4, 6))
    evaluation = train_data.make_eval_batches(config)
    val = pipeline.WorldSource("val", 4, 0, edits.WorldConfig(size=32))
    np.testing.assert_array_equal(evaluation[0]["target_image"], np.stack([val[i]["target_image"] for i in range(4)]))


def test_a_mixed_source_draws_the_fraction_from_the_file_and_the_rest_from_the_world(tmp_path):
    images = np.full((2, 32, 32, 3), 7, np.uint8)
    own = self_samples.SelfSampleSource(_save(tmp_path / "own.npz", [0, 4], images))
    world = _world(400)
    mixed = self_samples.MixedSource(own, world, 0.25, seed=3)
    picks = [mixed.pick(i) for i in range(len(mixed))]
    share = np.mean([p is not None for p in picks])
    assert len(mixed) == 400 and 0.18 < share < 0.32  # 100 expected, binomial sd 8.7
    assert {p for p in picks if p is not None} == {0, 1}
    assert picks == [self_samples.MixedSource(own, world, 0.25, seed=3).pick(i) for i in range(400)]
    assert picks != [self_samples.MixedSource(own, world, 0.25, seed=4).pick(i) for i in range(400)]
    for i in (picks.index(None), next(i for i, p in enumerate(picks) if p is not None)):
        expected = world[i] if picks[i] is None else own[picks[i]]
        np.testing.assert_array_equal(mixed[i]["target_image"], expected["target_image"])
        assert mixed[i]["instruction"] == expected["instruction"]
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="self_sample_fraction must be in"):
            self_samples.MixedSource(own, world, fraction)


def test_training_mixes_self_samples_into_the_world_by_the_config_fraction(tmp_path):
    config = defaults.world_data_config(32, batch_size=64, num_eval_examples=0)
    with config.unlocked():
        config.source = "self_samples"
        config.data_dir = str(_save(tmp_path / "own.npz", [0, 4], np.full((2, 32, 32, 3), 7, np.uint8)))
        config.num_train_examples = 256
        config.self_sample_fraction = 0.5
    batch = next(iter(train_data.make_train_dataset(config)))
    own_rows = (batch["target_image"] == 7).all(axis=(1, 2, 3))  # [64]
    assert 16 < own_rows.sum() < 48  # 32 expected, binomial sd 4
