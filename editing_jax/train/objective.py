"""The contract between a method and the generic trainer.

A method is an objective: how to initialize its variables and a pure loss. The trainer owns everything else (mesh,
sharded init, optimizer, jit, rng folding, guards, checkpoints, logging), so no method writes its own loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any
Batch = Mapping[str, jax.Array]
# (params, model_state, batch, rng) -> (loss, LossAux)
LossFn = Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, "LossAux"]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossAux:
    """What a loss returns beside the scalar: metrics (scalars) and the updated non-trainable model state.

    `model_state` holds collections other than params (e.g. a VQ codebook updated by EMA, code-usage counters); the
    trainer keeps the new value only when the step is finite.
    """

    metrics: dict[str, jax.Array]
    model_state: PyTree


@dataclasses.dataclass(frozen=True)
class Objective:
    """A trainable method.

    Attributes:
      name: short name used in logs.
      init: (rng, batch) -> variables dict, {'params': ..., <other collections>: ...}; params may carry
        `nn.with_logical_partitioning` annotations (the trainer reads them for sharding).
      loss: pure loss, see `LossFn`; must be jittable and not depend on Python-side state.
      visualize: optional (params, model_state, batch) -> (rows, column_labels) of images for PNG grids; rows is
        a list of lists of arrays [H, W, 3] in [0, 1].
      evaluate: optional (params, model_state, batches) -> dict of float metrics, run off the hot path.
      prepare_batch: optional host-side (NumPy) batch -> batch transform applied by the data pipeline before
        batches reach the device (e.g. text tokenization: strings never enter the step).
    """

    name: str
    init: Callable[[jax.Array, Batch], dict[str, PyTree]]
    loss: LossFn
    visualize: Callable[..., tuple[list[list[Any]], list[str]]] | None = None
    evaluate: Callable[..., dict[str, float]] | None = None
    prepare_batch: Callable[[Batch], Batch] | None = None
