"""Loading a trained editor and running it: single edits (`editing-jax edit`) and held-out evaluation (`eval`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from editing_jax.data import image_io
from editing_jax.methods import editmgt
from editing_jax.train import checkpoint


class EditorError(ValueError):
    """A checkpoint that is not an editor, or bad editing input."""


@dataclasses.dataclass
class Editor:
    """A trained EditMGT editor: modules, weights and its default sampling settings."""

    model: editmgt.EditMGT
    params: Any
    model_state: Any
    config: Any
    step: int
    _edit_fns: dict = dataclasses.field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def settings(self, **overrides) -> editmgt.SamplingSettings:
        return editmgt.SamplingSettings.from_config(self.config.sampling, **overrides)

    def edit_fn(self, settings: editmgt.SamplingSettings):
        """The compiled edit function for `settings` (cached: static settings change the graph)."""
        key = dataclasses.replace(settings, region_hold_threshold=0.0, gamma=1.0)
        if key not in self._edit_fns:
            self._edit_fns[key] = editmgt.make_edit_fn(self.model, settings)
        return self._edit_fns[key]

    def prepare(self, images: np.ndarray, instructions: list[str], query: str | None = None) -> dict[str, np.ndarray]:
        """Host batch for `run`: uint8 images `[B, S, S, 3]` at the model size, tokenized instructions."""
        encoded = self.model.text_tokenizer.encode(instructions)
        batch = {"source_image": images, "text_ids": encoded["ids"], "text_mask": encoded["mask"]}
        if query:
            keyword = self.model.text_tokenizer.find_phrase(instructions, query)
            if not keyword.any():
                raise EditorError(f"--query {query!r} does not occur in the instruction")
            batch["keyword_mask"] = keyword
        else:
            batch["keyword_mask"] = np.zeros_like(encoded["mask"])
        return batch

    def run(self, batch: dict, settings: editmgt.SamplingSettings, *, seed: int = 0) -> dict[str, np.ndarray]:
        return editmgt.run_edits(self.edit_fn(settings), self.params, self.model_state, batch, settings, seed=seed)


def load_editor(path: str | pathlib.Path) -> Editor:
    """Loads an EditMGT run (workdir, checkpoints dir or step dir)."""
    trained = checkpoint.load_trained(path)
    if trained.config.get("method") != "editmgt":
        raise EditorError(f"{path} is a {trained.config.get('method')!r} run, not an editor (method 'editmgt')")
    model = editmgt.build_model(trained.config)
    return Editor(model, trained.inference_params, trained.model_state, trained.config, trained.step)


def load_image_for(editor: Editor, path: str | pathlib.Path) -> np.ndarray:
    """Reads an image safely, center-crops it square and resizes it to the editor's resolution: uint8 [S, S, 3]."""
    image = image_io.read_image(path)
    image = image_io.center_crop_square(image)
    if image.shape[0] != editor.image_size:
        image = image_io.resize_image(image, (editor.image_size, editor.image_size))
    return image


def evaluate_split(
    editor: Editor,
    *,
    split: str = "test",
    num_examples: int = 256,
    batch_size: int = 64,
    thresholds: dict[str, float] | None = None,
    settings: editmgt.SamplingSettings | None = None,
    gamma: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Verifier success per edit type and preservation L1 on a world split, for each named threshold."""
    import tqdm

    from editing_jax.data import pipeline
    from editing_jax.data.world import edits

    if split not in ("train", "val", "test"):
        raise EditorError(f"split must be train, val or test, got {split!r}")
    if num_examples < 1:
        raise EditorError("num_examples must be >= 1")
    settings = settings or editor.settings()
    if thresholds is None:
        thresholds = {"plain": 0.0, "hold": settings.region_hold_threshold}
    world_seed = int(editor.config.data.seed)
    source = pipeline.WorldSource(split, num_examples, world_seed, edits.WorldConfig(size=editor.image_size))
    dataset = pipeline.make_dataset(
        source, batch_size=min(batch_size, num_examples), seed=0, shuffle=False, num_epochs=1, drop_remainder=False
    )
    batches = [editor.model.prepare_batch(batch) for batch in dataset]
    progress = tqdm.tqdm(total=len(batches), desc=f"eval {split}", unit="batch", disable=not show_progress)
    with progress:
        results = editmgt.evaluate_batches(
            editor.edit_fn(settings),
            editor.params,
            editor.model_state,
            batches,
            settings,
            thresholds=thresholds,
            gamma=gamma,
            seed=seed,
            progress=progress,
        )
    return {
        "split": split,
        "num_examples": num_examples,
        "checkpoint_step": editor.step,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "region_hold_threshold"},
        "gamma": settings.gamma if gamma is None else gamma,
        "results": results,
    }
