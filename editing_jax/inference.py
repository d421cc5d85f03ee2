"""Loading a trained editor and running it: single edits (`editing-jax edit`) and held-out evaluation (`eval`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from editing_jax.data import image_io
from editing_jax.data.world import edits
from editing_jax.methods import editmgt, flow_edit
from editing_jax.train import checkpoint

EDITOR_METHODS = ("editmgt", "flow_edit", "flow_grpo")


class EditorError(ValueError):
    """A checkpoint that is not an editor, or bad editing input."""


@dataclasses.dataclass
class Editor:
    """A trained editor (EditMGT, or the flow editor of `methods.flow_edit`): modules, weights, sampling settings.

    Both editors' compiled edit functions share one signature, so `run` and `evaluate_split` drive either; the flow
    editor has no attention maps or region hold (its settings are `flow_edit.FlowSettings`).
    """

    model: editmgt.EditMGT | flow_edit.FlowEditor
    params: Any
    model_state: Any
    config: Any
    step: int
    _edit_fns: dict = dataclasses.field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def is_flow(self) -> bool:
        """True for the flow editor (no attention maps, no region hold)."""
        return isinstance(self.model, flow_edit.FlowEditor)

    def settings(self, **overrides) -> editmgt.SamplingSettings | flow_edit.FlowSettings:
        """The checkpoint's sampling settings with `overrides`; ValueError for settings this model cannot run."""
        settings_cls = flow_edit.FlowSettings if self.is_flow else editmgt.SamplingSettings
        settings = settings_cls.from_config(self.config.sampling, **overrides)
        if not self.is_flow:
            self.edit_fn(settings)  # builds (lazily compiled) and validates against the model
        return settings

    def edit_fn(self, settings: editmgt.SamplingSettings | flow_edit.FlowSettings):
        """The compiled edit function for `settings` (cached: static settings change the graph)."""
        key = dataclasses.replace(settings, region_hold_threshold=0.0, gamma=1.0)
        if key not in self._edit_fns:
            make = flow_edit.make_edit_fn if self.is_flow else editmgt.make_edit_fn
            self._edit_fns[key] = make(self.model, settings)
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

    def run(self, batch: dict, settings, *, seed: int = 0) -> dict[str, np.ndarray]:
        return editmgt.run_edits(self.edit_fn(settings), self.params, self.model_state, batch, settings, seed=seed)


def load_editor(path: str | pathlib.Path) -> Editor:
    """Loads an EditMGT, flow-editor or GRPO run (workdir, checkpoints dir or step dir).

    A GRPO run (`flow_grpo`) is its SFT base joined with the trained adapters and token-focus modules.
    """
    trained = checkpoint.load_trained(path)
    method = trained.config.get("method")
    if method not in EDITOR_METHODS:
        raise EditorError(
            f"{path} is a {method!r} run, not an editor (method {' or '.join(map(repr, EDITOR_METHODS))})"
        )
    if method == "editmgt":
        return Editor(editmgt.build_model(trained.config), trained.inference_params, trained.model_state,
                      trained.config, trained.step)  # fmt: skip
    params = trained.inference_params
    if method == "flow_grpo":  # The saved config holds its SFT run's model fields.
        from editing_jax.methods import grpo

        params = grpo.editor_params(params, trained.model_state)
    return Editor(flow_edit.build_model(trained.config), params, trained.model_state, trained.config, trained.step)


def load_image_for(editor: Editor, path: str | pathlib.Path) -> np.ndarray:
    """Reads an image safely, center-crops it square and resizes it to the editor's resolution: uint8 [S, S, 3]."""
    image = image_io.read_image(path)
    image = image_io.center_crop_square(image)
    if image.shape[0] != editor.image_size:
        image = image_io.resize_image(image, (editor.image_size, editor.image_size))
    return image


def world_split_batches(editor: Editor, split: str, num_examples: int, batch_size: int = 64):
    """The first `num_examples` of a world split at the editor's size and world seed, as raw host batches in order."""
    from editing_jax.data import pipeline

    source = pipeline.WorldSource(split, num_examples, int(editor.config.data.seed),
                                  edits.WorldConfig(size=editor.image_size))  # fmt: skip
    return pipeline.make_dataset(source, batch_size=min(batch_size, num_examples), seed=0, shuffle=False,
                                 num_epochs=1, drop_remainder=False)  # fmt: skip


def evaluate_split(
    editor: Editor,
    *,
    split: str = "test",
    num_examples: int = 256,
    batch_size: int = 64,
    thresholds: dict[str, float] | None = None,
    settings: editmgt.SamplingSettings | flow_edit.FlowSettings | None = None,
    gamma: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Verifier success per edit type and preservation L1 on a world split, for each named threshold.

    The default thresholds are {'plain': 0, 'hold': the settings' region-hold threshold} for EditMGT ('hold' only
    when that threshold is > 0) and {'plain': 0} for the flow editor (it has no region hold).
    """
    import tqdm

    if split not in edits.SPLITS:
        raise EditorError(f"split must be one of {', '.join(edits.SPLITS)}, got {split!r}")
    if num_examples < 1:
        raise EditorError("num_examples must be >= 1")
    settings = settings or editor.settings()
    if thresholds is None:
        thresholds = {"plain": 0.0}
        if not editor.is_flow and settings.region_hold_threshold > 0:
            thresholds["hold"] = settings.region_hold_threshold
    raw_batches = world_split_batches(editor, split, num_examples, batch_size)
    batches = [editor.model.prepare_batch(batch) for batch in raw_batches]
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
        "settings": {
            k: v
            for k, v in dataclasses.asdict(settings).items()
            if k != "region_hold_threshold" and (not editor.is_flow or k in flow_edit.SAMPLER_FIELDS)
        },
        "gamma": settings.gamma if gamma is None else gamma,
        "results": results,
    }
