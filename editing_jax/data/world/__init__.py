"""The synthetic fine-grained editing world: scenes, renderer, edit generator and exact verifier."""

from editing_jax.data.world.edits import (
    SPLITS,
    Edit,
    EditSample,
    WorldConfig,
    generate_edit,
    generate_sample,
    render_edit,
)
from editing_jax.data.world.spec import Scene, SceneObject
from editing_jax.data.world.verifier import ParsedScene, VerifierResult, parse, score, verify

__all__ = [
    "SPLITS",
    "Edit",
    "EditSample",
    "ParsedScene",
    "Scene",
    "SceneObject",
    "VerifierResult",
    "WorldConfig",
    "generate_edit",
    "generate_sample",
    "parse",
    "render_edit",
    "score",
    "verify",
]
