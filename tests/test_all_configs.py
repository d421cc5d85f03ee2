"""Every config under configs/ loads, is locked and documents a command."""

from __future__ import annotations

import ast
import pathlib

import pytest

from editing_jax import config_lib

_CONFIGS_DIR = pathlib.Path(__file__).parents[1] / "configs"
_COMMAND_PREFIXES = ("editing-jax ", "python ")
_NO_CONFIGS = pytest.param(None, marks=pytest.mark.skip(reason=f"no configs under {_CONFIGS_DIR} yet"), id="no-configs")


def _variants(path: pathlib.Path) -> tuple[str, ...] | str:
    """Returns the module-level VARIANTS literal, or an error description."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "VARIANTS" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return "VARIANTS must be a literal tuple of strings"
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                return "VARIANTS must be a literal tuple of strings"
            return tuple(value)
    return ()


def _config_params() -> list:
    paths = config_lib.find_configs(_CONFIGS_DIR)
    params = [pytest.param(p, id=p.relative_to(_CONFIGS_DIR).as_posix()) for p in paths]
    return params or [_NO_CONFIGS]


def _variant_params() -> list:
    params = []
    for path in config_lib.find_configs(_CONFIGS_DIR):
        name = path.relative_to(_CONFIGS_DIR).as_posix()
        variants = _variants(path)
        if isinstance(variants, str):  # Malformed VARIANTS: report it as a failure.
            params.append(pytest.param(path, None, variants, id=f"{name}:VARIANTS"))
            continue
        params.extend(pytest.param(path, v, None, id=f"{name}:{v}") for v in variants)
    if not params:
        skip = pytest.mark.skip(reason="no config defines VARIANTS")
        return [pytest.param(None, None, None, marks=skip, id="no-variants")]
    return params


@pytest.mark.parametrize("path", _config_params())
def test_config_loads_locked(path: pathlib.Path):
    config = config_lib.load_config(str(path))
    assert config.is_locked, f"{path} is not locked after loading"


@pytest.mark.parametrize("path", _config_params())
def test_config_docstring_starts_with_command(path: pathlib.Path):
    command = config_lib.config_docstring_command(path)
    assert command.startswith(_COMMAND_PREFIXES), (
        f"{path}: module docstring must start with a command ('editing-jax ...' or 'python ...'), got {command!r}"
    )


@pytest.mark.parametrize("path, variant, problem", _variant_params())
def test_config_variant_loads(path: pathlib.Path, variant: str, problem: str | None):
    assert problem is None, f"{path}: {problem}"
    config = config_lib.load_config(f"{path}:{variant}")
    assert config.is_locked
