"""tfds builder for the synthetic editing world, prepared once as array_record and read without TF.

Example ``i`` of split ``s`` is exactly ``edits.generate_sample(s, seed, i,
WorldConfig(size=size)).to_example()``; records are stored in index order (tfds' hash shuffle is
disabled), so record ``i`` of the prepared split is sample ``i``. Record format per example:

* ``source_image``, ``target_image``: ``tfds.features.Image`` ``(S, S, 3)`` uint8, PNG (lossless).
* ``edit_mask``, ``object_mask``: ``Tensor`` uint8 ``(S, S)``, zlib-compressed, values 0/1.
* ``keyword_span``: ``Tensor`` int32 ``(2,)``.
* ``edit_type``: ``ClassLabel(names=spec.EDIT_TYPES)``; read back as its name.
* ``instruction``, ``source_caption``, ``target_caption``, ``keyword``, ``object_name``,
  ``source_scene``, ``target_scene`` (scene graphs as JSON): ``Text``; read back as ``str``.

Without TensorFlow, tfds can only write and read this through the NumPy code paths: images are
handed to tfds already PNG-encoded (tfds' own ndarray encoder calls ``tf.image``), the file format
must be ``array_record``, and reading goes through ``as_data_source()``. The GCS lookups tfds may
do are switched off; nothing touches the network.

The generation parameters live in the builder config (one tfds config per combination, see
:func:`config_name`) and in the dataset's ``metadata.json``, so :func:`load_world_source` reads a
prepared directory with ``tfds.builder_from_directory`` without knowing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from editing_jax.data.world import edits, spec

__all__ = [
    "EditingWorld",
    "EditingWorldConfig",
    "WorldRecordSource",
    "config_name",
    "load_world_source",
    "prepare_world_dataset",
]

_IMAGE_KEYS = ("source_image", "target_image")
_MASK_KEYS = ("edit_mask", "object_mask")
_TEXT_KEYS = (
    "instruction",
    "source_caption",
    "target_caption",
    "keyword",
    "object_name",
    "source_scene",
    "target_scene",
)


def config_name(size: int, seed: int, split_sizes: Mapping[str, int]) -> str:
    """tfds config name of one ``(size, seed, examples per split)`` combination.

    Every parameter that changes the data is spelled out, e.g. ``size32_seed0_train8_val4_test0``,
    so different datasets prepared into the same ``data_dir`` never share a folder.
    """
    counts = "_".join(f"{split}{int(split_sizes.get(split, 0))}" for split in edits.SPLITS)
    return f"size{int(size)}_seed{int(seed)}_{counts}"


@dataclasses.dataclass
class EditingWorldConfig(tfds.core.BuilderConfig):
    """Builder config: image size, generator seed and examples per split (0 = split absent)."""

    size: int = 64
    seed: int = 0
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


def _features(size: int) -> tfds.features.FeaturesDict:
    image = tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="png")
    mask = tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding="zlib")
    return tfds.features.FeaturesDict(
        {
            **{key: image for key in _IMAGE_KEYS},
            **{key: mask for key in _MASK_KEYS},
            **{key: tfds.features.Text() for key in _TEXT_KEYS},
            "edit_type": tfds.features.ClassLabel(names=spec.EDIT_TYPES),
            "keyword_span": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }
    )


def _encode_png(image: np.ndarray, size: int) -> bytes:
    """PNG bytes of a uint8 ``[S, S, 3]`` image (checked, since tfds does not check bytes)."""
    if image.dtype != np.uint8 or image.shape != (size, size, 3):
        raise ValueError(f"expected uint8 image of shape {(size, size, 3)}, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class EditingWorld(tfds.core.GeneratorBasedBuilder):
    """The synthetic fine-grained editing world (see ``editing_jax.data.world``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = EditingWorldConfig

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default resolves this through the `importlib_resources` backport (not a
        # dependency here); it is only used to look for a download checksums file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if not isinstance(config, EditingWorldConfig):
            raise ValueError("EditingWorld needs an EditingWorldConfig; use prepare_world_dataset()")
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Procedural flat-shape scenes with an instruction edit, exact target image, edit "
                f"and object masks and scene graphs; {config.size} px, seed {config.seed}."
            ),
            features=_features(config.size),
            disable_shuffling=True,  # Record i must be sample i.
            metadata=tfds.core.MetadataDict(size=config.size, seed=config.seed, split_sizes=config.split_sizes),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing to download.
        config = self.builder_config
        return {
            split: self._generate_examples(split, count) for split, count in config.split_sizes.items() if count > 0
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        world = edits.WorldConfig(size=config.size)
        for index in range(count):
            example = edits.generate_sample(split, config.seed, index, world).to_example()
            for key in _IMAGE_KEYS:
                example[key] = _encode_png(example[key], config.size)
            yield index, example


class _DropCustomConfigWarning(logging.Filter):
    """Drops tfds' 'Using custom data configuration' warning: every config here is custom."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


class _DropOpenCvWarning(logging.Filter):
    """Drops tfds' advice to install OpenCV: PIL decodes our small PNGs fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("OpenCV is not installed")


def _install_opencv_warning_filter() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOpenCvWarning) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOpenCvWarning())


# At import, so that grain worker processes unpickling a WorldRecordSource get it too.
_install_opencv_warning_filter()


@contextlib.contextmanager
def _tfds_output(show_progress: bool) -> Iterator[None]:
    """Silences tfds' progress bars, stdout banners and absl logging unless ``show_progress``."""
    absl_logger = logging.getLogger("absl")
    drop = _DropCustomConfigWarning()
    absl_logger.addFilter(drop)
    if show_progress:
        try:
            yield
        finally:
            absl_logger.removeFilter(drop)
        return
    tqdm_utils = tfds.core.utils.tqdm_utils
    progress_was_on = getattr(tqdm_utils, "_active", True)
    old_level = absl_logger.level
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.setLevel(old_level)
        absl_logger.removeFilter(drop)
        tfds.display_progress_bar(progress_was_on)


def prepare_world_dataset(
    data_dir: str | os.PathLike[str],
    *,
    split_sizes: Mapping[str, int],
    size: int,
    seed: int,
    show_progress: bool = True,
) -> pathlib.Path:
    """Generates the world into ``data_dir`` as array_record (offline, no TensorFlow).

    Preparing an existing combination again reuses it without regenerating.

    Args:
        data_dir: tfds data directory; the dataset goes to
            ``data_dir/editing_world/<config_name>/1.0.0``.
        split_sizes: Examples per split, keys from ``edits.SPLITS``; missing or 0 = not generated.
        size: Image side in pixels.
        seed: World seed (``edits.generate_sample``'s ``seed``).
        show_progress: Show tfds' progress bars and messages.

    Returns:
        The prepared dataset directory (the one holding ``dataset_info.json``).
    """
    unknown = set(split_sizes) - set(edits.SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected keys from {edits.SPLITS}")
    if any(int(n) < 0 for n in split_sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {dict(split_sizes)}")
    if not any(int(n) > 0 for n in split_sizes.values()):
        raise ValueError(f"at least one split needs examples, got {dict(split_sizes)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    edits.WorldConfig(size=size)  # Validates size.

    counts = {split: int(split_sizes.get(split, 0)) for split in edits.SPLITS}
    config = EditingWorldConfig(
        name=config_name(size, seed, counts),
        description=f"size={size} seed={seed} examples={counts}",
        size=int(size),
        seed=int(seed),
        num_train=counts["train"],
        num_val=counts["val"],
        num_test=counts["test"],
    )
    with _tfds_output(show_progress), tempfile.TemporaryDirectory() as download_dir:
        builder = EditingWorld(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return pathlib.Path(os.fspath(builder.data_path))


class WorldRecordSource:
    """Random-access view of one prepared split, yielding dicts like ``EditSample.to_example()``.

    Text fields come back as ``str``, ``edit_type`` as its name, images as uint8 ``[S, S, 3]``,
    masks as uint8 ``[S, S]``, ``keyword_span`` as int32 ``[2]``. Picklable (for grain workers).
    """

    def __init__(
        self,
        records: Any,
        *,
        text_keys: Sequence[str],
        label_names: Mapping[str, Sequence[str]],
        metadata: Mapping[str, Any],
        split: str,
        dataset_dir: pathlib.Path,
    ):
        self._records = records
        self._text_keys = tuple(text_keys)
        self._label_names = {key: tuple(names) for key, names in label_names.items()}
        self.metadata = dict(metadata)
        self.split = split
        self.dataset_dir = dataset_dir

    def __len__(self) -> int:
        return len(self._records)

    def _convert(self, record: Mapping[str, Any]) -> dict[str, Any]:
        example = dict(record)
        for key in self._text_keys:
            value = example[key]
            example[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        for key, names in self._label_names.items():
            example[key] = names[int(example[key])]
        return example

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return self._convert(self._records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._convert(record) for record in self._records.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"WorldRecordSource({str(self.dataset_dir)!r}, split={self.split!r}, len={len(self)})"


def load_world_source(dataset_dir: str | os.PathLike[str], split: str) -> WorldRecordSource:
    """Opens a split of a prepared dataset for random access, without the builder's config.

    Args:
        dataset_dir: Directory returned by :func:`prepare_world_dataset` (with
            ``dataset_info.json``); any array_record tfds dataset with Text/ClassLabel fields works.
        split: Split name, e.g. ``"train"``.

    Returns:
        A :class:`WorldRecordSource`; its ``metadata`` holds ``size``, ``seed`` and
        ``split_sizes`` for world datasets.
    """
    path = pathlib.Path(dataset_dir)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{path}: not a prepared tfds dataset (no dataset_info.json)")
    with _tfds_output(show_progress=False):
        builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise ValueError(f"{path}: no split {split!r}; available: {sorted(builder.info.splits)}")
    features = builder.info.features
    text_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    label_names = {k: f.names for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)}
    return WorldRecordSource(
        builder.as_data_source(split),
        text_keys=text_keys,
        label_names=label_names,
        metadata=dict(builder.info.metadata or {}),
        split=split,
        dataset_dir=path,
    )
