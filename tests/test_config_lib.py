"""Tests for editing_jax.config_lib."""

from __future__ import annotations

import json
import pathlib
import textwrap

import ml_collections
import pytest

from editing_jax import config_lib
from editing_jax.config_lib import ConfigError

_FIXTURE_CONFIG = '''\
"""editing-jax train --config=fixture.py:size=32,tiny

Fixture config used by the config_lib tests.
"""

import ml_collections

from editing_jax import config_lib

VARIANTS = ("size=32", "tiny", "size=16,tiny")


def get_config(arg=None):
    opts = config_lib.parse_config_arg(arg, allowed=("size", "tiny"))
    config = ml_collections.ConfigDict()
    config.name = "fixture"
    config.seed = 0
    config.lr = 1e-4
    config.use_ema = True
    config.size = int(opts.get("size", 64))
    config.resolution = (64, 64)
    config.layers = [1, 2]
    config.ckpt = None
    config.model = ml_collections.ConfigDict()
    config.model.width = 8 if opts.get("tiny") else 128
    config.model.depth = 2
    config.model.act = "gelu"
    config.model.head = ml_collections.ConfigDict({"dim": 4})
    return config
'''


@pytest.fixture
def config_path(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "configs" / "fixture" / "base.py"
    path.parent.mkdir(parents=True)
    path.write_text(_FIXTURE_CONFIG)
    return path


@pytest.fixture
def config(config_path: pathlib.Path) -> ml_collections.ConfigDict:
    return config_lib.load_config(str(config_path))


# ------------------------------------------------------------ parse_config_arg


@pytest.mark.parametrize(
    "arg, expected",
    [
        (None, {}),
        ("", {}),
        ("tiny", {"tiny": True}),
        ("size=32,tiny", {"size": "32", "tiny": True}),
        (" size = 32 , tiny ,", {"size": "32", "tiny": True}),
        ("expr=a=b", {"expr": "a=b"}),
        ("empty=", {"empty": ""}),
    ],
)
def test_parse_config_arg(arg, expected):
    assert config_lib.parse_config_arg(arg) == expected


@pytest.mark.parametrize("arg", ["=3", "size=1,size=2"])
def test_parse_config_arg_errors(arg):
    with pytest.raises(ConfigError):
        config_lib.parse_config_arg(arg)


def test_parse_config_arg_allowed():
    assert config_lib.parse_config_arg("tiny", allowed=("tiny", "size")) == {"tiny": True}
    with pytest.raises(ConfigError, match="unknown config arg 'big'.*valid: size, tiny"):
        config_lib.parse_config_arg("big", allowed=("tiny", "size"))


# ----------------------------------------------------------------- load_config


def test_load_default(config):
    assert config.name == "fixture"
    assert config.size == 64
    assert config.model.width == 128


def test_load_with_arg(config_path):
    config = config_lib.load_config(f"{config_path}:size=32,tiny")
    assert config.size == 32
    assert config.model.width == 8


def test_load_with_overrides(config_path):
    config = config_lib.load_config(f"{config_path}:tiny", ["--config.model.width=64", "config.seed=3"])
    assert config.model.width == 64
    assert config.seed == 3


def test_load_is_locked(config):
    assert config.is_locked
    assert config.model.is_locked
    with pytest.raises(AttributeError):
        config.new_key = 1
    with pytest.raises(ConfigError, match=r"unknown config key 'new_key'; valid keys .*: ckpt, layers, lr"):
        config_lib.apply_overrides(config, ["new_key=1"])


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.py"
    with pytest.raises(ConfigError, match="nope.py"):
        config_lib.load_config(f"{path}:tiny")


def test_load_without_get_config(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text('"""python -c pass"""\nX = 1\n')
    with pytest.raises(ConfigError, match="does not define get_config"):
        config_lib.load_config(str(path))


def test_load_get_config_without_parameters(tmp_path):
    path = tmp_path / "noarg.py"
    path.write_text(
        textwrap.dedent(
            """\
            import ml_collections

            def get_config():
                return ml_collections.ConfigDict({"a": 1})
            """
        )
    )
    assert config_lib.load_config(str(path)).a == 1
    with pytest.raises(ConfigError, match="takes no argument"):
        config_lib.load_config(f"{path}:tiny")


def test_load_rejects_bad_variant(config_path):
    with pytest.raises(ConfigError, match="unknown config arg 'huge'"):
        config_lib.load_config(f"{config_path}:huge")


def test_load_rejects_non_config(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def get_config(arg=None):\n    return 3\n")
    with pytest.raises(ConfigError, match="expected a ConfigDict"):
        config_lib.load_config(str(path))


def test_loads_are_independent(config_path):
    first = config_lib.load_config(str(config_path), ["seed=1"])
    second = config_lib.load_config(str(config_path))
    assert first.seed == 1
    assert second.seed == 0


# ------------------------------------------------------------- apply_overrides


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("--config.seed=7", "seed", 7),
        ("seed=-2", "seed", -2),
        ("lr=1e-3", "lr", 1e-3),
        ("lr=2", "lr", 2.0),
        ("use_ema=false", "use_ema", False),
        ("use_ema=No", "use_ema", False),
        ("use_ema=TRUE", "use_ema", True),
        ("use_ema=1", "use_ema", True),
        ("name=other", "name", "other"),
        ("name=1", "name", "1"),
        ("resolution=(32, 48)", "resolution", (32, 48)),
        ("resolution=[32,48]", "resolution", (32, 48)),
        ("layers=[3]", "layers", [3]),
        ("ckpt=/tmp/ckpt", "ckpt", "/tmp/ckpt"),
        ("ckpt=5", "ckpt", 5),
        ("ckpt=None", "ckpt", None),
        ("seed=None", "seed", None),
        ("model.act=relu", "model.act", "relu"),
        ("--config.model.head.dim=16", "model.head.dim", 16),
    ],
)
def test_override_coercion(config, override, key, expected):
    config_lib.apply_overrides(config, [override])
    value = config
    for part in key.split("."):
        value = value[part]
    assert value == expected
    assert type(value) is type(expected)


def test_override_returns_config(config):
    assert config_lib.apply_overrides(config, []) is config


def test_override_float_keeps_type(config):
    config_lib.apply_overrides(config, ["lr=3"])
    assert isinstance(config.lr, float)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("use_ema=maybe", r"invalid value 'maybe' for config key 'use_ema': expected bool"),
        ("seed=1.5", r"invalid value '1.5' for config key 'seed': expected int"),
        ("lr=fast", r"invalid value 'fast' for config key 'lr': expected float"),
        ("resolution=[a,b]", r"invalid value '\[a,b\]' for config key 'resolution'"),
        ("resolution=3", r"expected tuple"),
    ],
)
def test_override_bad_value(config, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_lib.apply_overrides(config, [override])


def test_override_unknown_nested_key(config):
    with pytest.raises(ConfigError) as info:
        config_lib.apply_overrides(config, ["--config.model.widht=3"])
    message = str(info.value)
    assert message.startswith("unknown config key 'model.widht'; valid keys under 'model': act, depth, head, width")
    assert "did you mean 'width'" in message
    assert "\n" not in message


def test_override_unknown_top_level_key(config):
    with pytest.raises(ConfigError, match="unknown config key 'modle.width'; valid keys"):
        config_lib.apply_overrides(config, ["modle.width=3"])


def test_override_through_non_group(config):
    with pytest.raises(ConfigError, match="'seed' is a int, not a group"):
        config_lib.apply_overrides(config, ["seed.x=3"])


def test_override_group_itself(config):
    with pytest.raises(ConfigError, match="'model.head' is a group.*dim"):
        config_lib.apply_overrides(config, ["model.head=3"])


@pytest.mark.parametrize("override", ["--config.seed", "seed", "=3", "model..width=3"])
def test_override_malformed(config, override):
    with pytest.raises(ConfigError):
        config_lib.apply_overrides(config, [override])


def test_override_rejects_plain_string(config):
    with pytest.raises(TypeError):
        config_lib.apply_overrides(config, "seed=1")


# ------------------------------------------------------ split_config_overrides


def test_split_config_overrides():
    argv = [
        "--workdir",
        "/tmp/w",
        "--config.seed=3",
        "--config.model.width",
        "64",
        "--config=configs/a.py:tiny",
        "--config.lr",
        "-1e-3",
        "pos",
        "--",
        "--config.x=1",
    ]
    other, overrides = config_lib.split_config_overrides(argv)
    assert other == [
        "--workdir",
        "/tmp/w",
        "--config=configs/a.py:tiny",
        "pos",
        "--",
        "--config.x=1",
    ]
    assert overrides == ["--config.seed=3", "--config.model.width=64", "--config.lr=-1e-3"]


@pytest.mark.parametrize("argv", [["--config.seed"], ["--config.seed", "--other"]])
def test_split_config_overrides_missing_value(argv):
    with pytest.raises(ConfigError, match="expects a value"):
        config_lib.split_config_overrides(argv)


def test_split_then_apply(config):
    _, overrides = config_lib.split_config_overrides(["--config.model.depth", "5"])
    config_lib.apply_overrides(config, overrides)
    assert config.model.depth == 5


# ------------------------------------------------------------------------ JSON


def test_json_round_trip(config):
    text = config_lib.config_to_json(config)
    restored = config_lib.config_from_json(text)
    assert restored.is_locked
    assert config_lib.config_to_json(restored) == text
    assert restored.resolution == (64, 64)
    assert restored.model.head.dim == 4
    assert restored.ckpt is None


def test_json_is_sorted_and_stable(config):
    text = config_lib.config_to_json(config)
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["resolution"] == [64, 64]
    assert config_lib.config_to_json(config) == text


def test_json_rejects_unserializable():
    config = ml_collections.ConfigDict({"fn": object()})
    with pytest.raises(ConfigError, match="'fn'"):
        config_lib.config_to_json(config)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_config_from_json_errors(text):
    with pytest.raises(ConfigError):
        config_lib.config_from_json(text)


# ------------------------------------------------------------------- discovery


def test_find_configs(tmp_path, config_path):
    root = tmp_path / "configs"
    (root / "__init__.py").write_text("")
    (root / "fixture" / "_common.py").write_text("def get_config():\n    pass\n")
    (root / "fixture" / "helpers.py").write_text("X = 1\n")
    (root / "_private").mkdir()
    (root / "_private" / "cfg.py").write_text("def get_config():\n    pass\n")
    (root / "other.py").write_text("from x import get_config\n")
    assert config_lib.find_configs(root) == [config_path, root / "other.py"]
    assert config_lib.find_configs(tmp_path / "missing") == []


def test_config_docstring_command(config_path, tmp_path):
    command = config_lib.config_docstring_command(config_path)
    assert command == "editing-jax train --config=fixture.py:size=32,tiny"
    path = tmp_path / "nodoc.py"
    path.write_text("def get_config():\n    pass\n")
    with pytest.raises(ConfigError, match="no module docstring"):
        config_lib.config_docstring_command(path)
