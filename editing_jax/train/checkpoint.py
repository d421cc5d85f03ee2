"""Orbax checkpoints: one CheckpointManager saving train state, data-iterator state and config JSON together.

Saves are async (the train loop continues while arrays are written). Orbax writes each step to a temporary
directory and renames it when complete, so a kill during a save leaves no committed partial step. A committed step
that fails to restore (e.g. a truncated file) is skipped in favour of the previous one, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint problem the user must fix (e.g. an explicit restore path that does not exist)."""


class Checkpointer:
    """Saves and restores (train state, data iterator state, config) under `directory`."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict | None, config_json: str, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(config_json)),
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores `step` onto the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, dict(restored.data or {}), dict(restored.config or {})

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """Restores the newest step that restores cleanly; None when there is no usable checkpoint.

        Unreadable newer steps are deleted after a successful fallback, so training can save those steps again.
        """
        unreadable = []
        for step in reversed(self.steps()):
            try:
                restored = (step, *self.restore(step, abstract_state))
            except Exception as error:  # noqa: BLE001 - any failure means this step is unusable.
                message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                logger.warning("checkpoint step %d in %s is unreadable (%s); trying an earlier one", step,
                               self.directory, message)  # fmt: skip
                unreadable.append(step)
                continue
            for bad in unreadable:
                self._manager.delete(bad)
            return restored
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings, the restore target for Orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def resolve_restore_path(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """`--restore PATH`: a checkpoints directory (latest step) or one step directory inside it.

    Raises CheckpointError when the path does not exist: an explicit restore never silently starts fresh.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"--restore {path} does not exist")
    if path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise CheckpointError(f"--restore {path} holds no checkpoint steps")


@dataclasses.dataclass
class TrainedModel:
    """A trained run loaded for inference: arrays as saved (on the default device), and the run's config."""

    params: Any
    model_state: Any
    ema_params: Any
    config: Any  # ml_collections.ConfigDict
    step: int
    directory: pathlib.Path

    @property
    def inference_params(self) -> Any:
        """EMA params when the run kept them, else the raw params."""
        return self.ema_params if self.ema_params is not None else self.params


def load_trained(path: str | pathlib.Path) -> TrainedModel:
    """Loads params, model state and config of a run (a workdir, its checkpoints directory or one step directory).

    Raises CheckpointError with a one-line reason when nothing usable is there.
    """
    from editing_jax import config_lib

    directory, step = resolve_restore_path(path)
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{path} holds no committed checkpoint step")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
        try:
            restored = manager.restore(step, args=args)
        except Exception as error:  # noqa: BLE001 - report any unreadable checkpoint as a user-facing error.
            raise CheckpointError(f"cannot read checkpoint step {step} in {directory}: {error}") from error
    finally:
        manager.close()
    state = restored.state
    config = config_lib.config_from_json(json.dumps(restored.config))
    return TrainedModel(
        params=state["params"],
        model_state=state.get("model_state") or {},
        ema_params=state.get("ema_params"),
        config=config,
        step=int(step),
        directory=directory,
    )
