"""Loading, overriding and serializing ml_collections experiment configs.

Conventions:

* A config is a ``.py`` file under ``configs/<group>/<name>.py`` that defines
  ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``.
* ``arg`` is a comma-separated variant string such as ``"size=32,tiny"``
  (``key=value`` items and bare flags); see `parse_config_arg`.
* The module docstring of a config starts with a runnable command
  (``editing-jax ...`` or ``python ...``); see `config_docstring_command`.
* Loaded configs are locked: overriding an unknown key is a `ConfigError`
  that lists the valid keys.
* Overrides come from the command line as ``--config.key=value`` (nested:
  ``--config.model.width=64``); see `split_config_overrides` and
  `apply_overrides`.

Example::

    config = load_config("configs/world/base.py:size=32,tiny",
                         ["--config.model.width=64"])
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import itertools
import json
import pathlib
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import ml_collections

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_docstring_command",
    "config_from_json",
    "config_to_json",
    "find_configs",
    "load_config",
    "parse_config_arg",
    "split_config_overrides",
]

_OVERRIDE_PREFIXES = ("--config.", "config.")
_TRUE_STRINGS = frozenset({"true", "1", "yes"})
_FALSE_STRINGS = frozenset({"false", "0", "no"})
_module_counter = itertools.count()


class ConfigError(ValueError):
    """A user-facing config problem, described in a one-line message."""


# --------------------------------------------------------------------------
# Variant strings.
# --------------------------------------------------------------------------


def parse_config_arg(arg: str | None, allowed: Collection[str] | None = None) -> dict[str, str | bool]:
    """Parses a ``get_config`` variant string.

    ``'size=32,tiny'`` -> ``{'size': '32', 'tiny': True}``; ``None``/``''`` -> ``{}``.
    Whitespace around items is ignored; values stay strings.

    Args:
      arg: The variant string, or None.
      allowed: If given, the valid item names; any other name is an error.

    Returns:
      A dict mapping item names to their string value (bare flags map to True).

    Raises:
      ConfigError: On an empty name, a repeated name or a name not in `allowed`.
    """
    result: dict[str, str | bool] = {}
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not name:
            raise ConfigError(f"config arg item {item!r} in {arg!r} has an empty name")
        if name in result:
            raise ConfigError(f"config arg {arg!r} sets {name!r} more than once")
        if allowed is not None and name not in allowed:
            raise ConfigError(f"unknown config arg {name!r} in {arg!r}; valid: {', '.join(sorted(allowed))}")
        result[name] = value.strip() if sep else True
    return result


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str | None]:
    """Splits ``'path/to/config.py:arg'`` into path and arg (None if absent)."""
    index = spec.find(".py:")
    if index < 0:
        return spec, None
    path, arg = spec[: index + 3], spec[index + 4 :]
    return path, (arg or None)


def _import_config_module(path: pathlib.Path) -> Any:
    """Imports a config file by path under a unique module name."""
    module_name = f"_editing_jax_config_{next(_module_counter)}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import config file '{path}'")
    module = importlib.util.module_from_spec(module_spec)
    # Registered so that dataclasses/pickle inside the config can find it.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _takes_no_arguments(fn: Any) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return not signature.parameters


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads, locks and overrides a config.

    Args:
      spec: ``'path/to/config.py'`` or ``'path/to/config.py:arg'``; `arg` is
        passed to ``get_config`` (see `parse_config_arg`).
      overrides: Overrides as accepted by `apply_overrides`.

    Returns:
      The locked config, with `overrides` applied.

    Raises:
      ConfigError: If the file is missing, defines no ``get_config``, its
        ``get_config`` takes no argument but one was given, returns something
        other than a config, or an override is invalid. Errors raised while
        executing the config file itself propagate unchanged.
    """
    path_str, arg = _split_spec(spec)
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.suffix != ".py":
        raise ConfigError(f"config file '{path}' is not a .py file")

    module = _import_config_module(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file '{path}' does not define get_config()")

    if _takes_no_arguments(get_config):
        if arg is not None:
            raise ConfigError(f"get_config() in '{path}' takes no argument, but got {arg!r}")
        config = get_config()
    else:
        config = get_config(arg)

    if isinstance(config, ml_collections.ConfigDict):
        pass
    elif isinstance(config, Mapping):
        config = ml_collections.ConfigDict(dict(config))
    else:
        raise ConfigError(f"get_config() in '{path}' returned {type(config).__name__}, expected a ConfigDict")
    config.lock()
    return apply_overrides(config, overrides)


# --------------------------------------------------------------------------
# Overrides.
# --------------------------------------------------------------------------


def _strip_override_prefix(text: str) -> str:
    for prefix in _OVERRIDE_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _literal(text: str) -> Any:
    """Evaluates a Python literal; raises ValueError if `text` is not one."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(str(e)) from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE_STRINGS:
        return True
    if lowered in _FALSE_STRINGS:
        return False
    raise ValueError(text)


def _parse_sequence(text: str, field_type: type) -> Any:
    value = _literal(text)
    if isinstance(value, (tuple, list)):
        return field_type(value)
    raise ValueError(text)


def _parse_value(text: str, field_type: type) -> Any:
    """Parses `text` to `field_type`; raises ValueError if it does not fit."""
    if field_type is type(None):
        try:
            return _literal(text)
        except ValueError:
            return text
    if field_type is str:
        return text
    if field_type is bool:
        return _parse_bool(text)
    if text.strip() == "None":
        return None
    if field_type is int:
        return int(text)
    if field_type is float:
        return float(text)
    if field_type in (tuple, list):
        return _parse_sequence(text, field_type)
    # Any other type: let ml_collections' assignment type check decide.
    try:
        return _literal(text)
    except ValueError:
        return text


def _type_name(field_type: type) -> str:
    return "None (any Python literal)" if field_type is type(None) else field_type.__name__


def _unknown_key_error(key: str, node: ml_collections.ConfigDict, prefix: str, name: str) -> str:
    valid = sorted(node.keys())
    where = f"under '{prefix}'" if prefix else "(top level)"
    message = f"unknown config key '{key}'; valid keys {where}: {', '.join(valid) or '<none>'}"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        message += f" (did you mean '{close[0]}'?)"
    return message


def _apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    body = _strip_override_prefix(override.strip())
    key, sep, text = body.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"config override {override!r} has no '='; expected key=value")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config override {override!r} has an invalid key")

    parts = key.split(".")
    node = config
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key '{key}': '{prefix}' is a {type(node).__name__}, not a group")
        if name not in node:
            raise ConfigError(_unknown_key_error(key, node, prefix, name))
        if depth < len(parts) - 1:
            node = node[name]

    leaf = parts[-1]
    field_type = node.get_type(leaf)
    if issubclass(field_type, ml_collections.ConfigDict):
        subkeys = ", ".join(sorted(node[leaf].keys()))
        raise ConfigError(f"config key '{key}' is a group; override its fields instead: {subkeys or '<none>'}")
    try:
        value = _parse_value(text, field_type)
        node[leaf] = value
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid value {text!r} for config key '{key}': expected {_type_name(field_type)}") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``key=value`` overrides to `config` in place.

    Each override is ``--config.a.b=v``, ``config.a.b=v`` or ``a.b=v``. The
    value is parsed to the existing field's type: int; float (``'1e-3'``);
    bool (true/false/1/0/yes/no, any case); str (taken verbatim); tuple/list
    (a Python literal such as ``'(1, 2)'``). ``'None'`` sets a non-str,
    non-bool field to None. Fields currently None take any Python literal,
    falling back to the raw string.

    Args:
      config: The (usually locked) config to modify.
      overrides: The override strings, applied in order.

    Returns:
      `config` itself.

    Raises:
      ConfigError: On a missing ``'='``, an unknown key (the message lists the
        valid keys) or a value that does not parse to the field's type.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of strings, not a str")
    for override in overrides:
        _apply_override(config, override)
    return config


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.*`` overrides from other command-line tokens.

    Accepts ``--config.x=y`` and the two-token form ``--config.x y``. Tokens
    after a bare ``--`` are never treated as overrides.

    Args:
      argv: Command-line tokens (without the program name).

    Returns:
      ``(other_args, overrides)``; each override is ``'--config.x=y'``.

    Raises:
      ConfigError: If a two-token ``--config.x`` has no value after it.
    """
    other: list[str] = []
    overrides: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            other.extend(tokens[i:])
            break
        if token.startswith("--config.") and len(token) > len("--config."):
            if "=" in token:
                overrides.append(token)
            else:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise ConfigError(f"config override {token} expects a value")
                overrides.append(f"{token}={tokens[i + 1]}")
                i += 1
        else:
            other.append(token)
        i += 1
    return other, overrides


# --------------------------------------------------------------------------
# JSON.
# --------------------------------------------------------------------------


def _to_jsonable(value: Any, key: str) -> Any:
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        items = value.items()
        return {str(k): _to_jsonable(v, f"{key}.{k}" if key else str(k)) for k, v in items}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy / jax scalars and arrays.
        return _to_jsonable(value.tolist(), key)
    raise ConfigError(f"config key '{key}' holds a {type(value).__name__}, which is not JSON-serializable")


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """Serializes `config` to stable JSON (sorted keys, indent 2).

    Tuples and lists become JSON arrays; numpy-like values use ``.tolist()``.

    Raises:
      ConfigError: If a value is not JSON-serializable.
    """
    return json.dumps(_to_jsonable(config, ""), sort_keys=True, indent=2)


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Parses `config_to_json` output into a locked config.

    JSON arrays come back as tuples (lists in the original config therefore
    become tuples); ``config_to_json`` of the result equals its input.

    Raises:
      ConfigError: If `text` is not JSON or not a JSON object.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid config JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config JSON must be an object, got {type(data).__name__}")
    config = ml_collections.ConfigDict(_from_jsonable(data))
    config.lock()
    return config


# --------------------------------------------------------------------------
# Discovery.
# --------------------------------------------------------------------------


def _defines_get_config(path: pathlib.Path) -> bool:
    """Whether the module at `path` binds ``get_config`` at top level."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError:
        return True  # Keep it, so that loading it surfaces the error.
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == "get_config":
                return True
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == "get_config" for t in node.targets):
                return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name) == "get_config" for a in node.names):
                return True
    return False


def find_configs(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Lists the config files under a ``configs/`` directory.

    Args:
      root: The ``configs/`` directory, searched recursively.

    Returns:
      Sorted paths of ``.py`` files defining ``get_config``, skipping
      ``__init__.py`` and files or directories whose name starts with ``_``
      or ``.``. Empty if `root` does not exist.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part.startswith(("_", ".")) for part in relative.parts):
            continue
        if path.is_file() and _defines_get_config(path):
            found.append(path)
    return found


def config_docstring_command(path: str | pathlib.Path) -> str:
    """Returns the first non-empty line of a config file's module docstring.

    By convention this is a runnable command (``editing-jax ...`` or
    ``python ...``).

    Raises:
      ConfigError: If the file is missing, does not parse, or has no docstring.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"config file '{path}' does not parse: {e.msg}") from None
    docstring = ast.get_docstring(tree)
    for line in (docstring or "").splitlines():
        if line.strip():
            return line.strip()
    raise ConfigError(f"config file '{path}' has no module docstring")
