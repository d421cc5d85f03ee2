"""diffusers conv-trunk weights (VAE `Encoder`/`Decoder`, `quant_conv`, ...) -> `editing_jax.nn.conv` parameter trees.

`editing_jax.nn.conv` mirrors diffusers' module names, so the conversion is mechanical and shared by every model built
on that trunk (the VQ tokenizer in `editing_jax.convert.vq`, and the KL autoencoder, whose diffusers state dict has the
same `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` layout):
  * names: list indices join their parent with `_` (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`,
    `attentions.0.to_out.0` -> `attentions_0/to_out_0`);
  * `Conv2d.weight [O, I, kh, kw]` -> `kernel [kh, kw, I, O]`; `Linear.weight [O, I]` (attention projections) ->
    `kernel [I, O]`; `GroupNorm.weight [C]` -> `scale`; biases unchanged;
  * pre-0.14 diffusers attention names (`query`, `key`, `value`, `proj_attn`) are renamed to `to_q`, `to_k`, `to_v`,
    `to_out.0`, as diffusers itself does when it loads such checkpoints.
`check_tree` compares a converted tree with the names and shapes a model's `init` would create, so a checkpoint whose
architecture differs from the model fails loudly, naming the offending parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from editing_jax.convert.flux_blocks import _flax_path

__all__ = ["check_tree", "torch_conv_state_dict_to_flax"]

_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_module_name(module: str) -> str:
    """`mid_block.attentions.0.query` -> `mid_block.attentions.0.to_q` (other names unchanged)."""
    parent, _, last = module.rpartition(".")
    if last in _DEPRECATED_ATTENTION_NAMES and ".attentions." in f".{parent}.":
        return f"{parent}.{_DEPRECATED_ATTENTION_NAMES[last]}"
    return module


def torch_conv_state_dict_to_flax(state_dict: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """Converts a state dict of Conv2d / Linear / GroupNorm modules (diffusers names) into a Flax 'params' tree.

    Args:
      state_dict: keys like `encoder.down_blocks.0.resnets.0.norm1.weight` to arrays (NumPy, or anything `np.asarray`
        takes); every key must end in `.weight` or `.bias`.
      dtype: optional dtype to cast every parameter to (default: keep the stored dtype).

    Returns:
      The nested params dict (without the outer {'params': ...}).

    Raises:
      ValueError: a key that is not a weight/bias, or a weight whose rank is not 1 (norm), 2 (linear) or 4 (conv).
    """
    params: dict[str, Any] = {}
    for key in sorted(state_dict):
        module, _, leaf = key.rpartition(".")
        array = np.asarray(state_dict[key])
        if leaf == "bias" and array.ndim == 1:
            name, value = "bias", array
        elif leaf == "weight" and array.ndim == 4:
            name, value = "kernel", array.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        elif leaf == "weight" and array.ndim == 2:
            name, value = "kernel", array.T  # [O, I] -> [I, O]
        elif leaf == "weight" and array.ndim == 1:
            name, value = "scale", array  # GroupNorm
        else:
            raise ValueError(
                f"cannot convert '{key}' of shape {array.shape}: expected a conv/linear/norm weight or bias"
            )
        if dtype is not None:
            value = value.astype(dtype)
        node = params
        for part in _flax_path(_modern_module_name(module)):
            node = node.setdefault(part, {})
        if name in node:
            raise ValueError(f"'{key}' converts to a parameter that another key already produced")
        node[name] = np.ascontiguousarray(value)
    return params


def check_tree(converted: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raises `ValueError` unless `converted` has exactly the leaves and shapes of `expected`.

    Args:
      converted: a nested dict of arrays (e.g. from `torch_conv_state_dict_to_flax`).
      expected: the same structure with anything that has a `.shape` as leaves (e.g. `jax.eval_shape` of an init).
      what: a name for the error message.
    """
    got = {"/".join(path): np.shape(leaf) for path, leaf in traverse_util.flatten_dict(dict(converted)).items()}
    want = {"/".join(path): tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(dict(expected)).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what}: missing parameters {missing}, unexpected parameters {unexpected}")
    wrong = [f"{path}: {got[path]} (expected {want[path]})" for path in sorted(want) if got[path] != want[path]]
    if wrong:
        raise ValueError(f"{what}: shape mismatches: {wrong}")
