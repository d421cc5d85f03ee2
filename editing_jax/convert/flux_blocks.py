"""diffusers Flux block weights -> `editing_jax.nn.transformer` parameter trees.

One `FluxTransformerBlock` ('double') or `FluxSingleTransformerBlock` ('single') state dict (keys relative to the
block, e.g. `attn.to_q.weight`) becomes the 'params' tree of a `DoubleStreamBlock` / `SingleStreamBlock`:
  * names: list indices join their parent with `_` (`attn.to_out.0` -> `attn/to_out_0`, `ff.net.0.proj` ->
    `ff/net_0/proj`);
  * `torch.nn.Linear.weight [out, in]` -> `kernel [in, out]`; biases unchanged;
  * `torch.nn.RMSNorm.weight [head_dim]` (`attn.norm_q` etc.) -> `scale`.
The key set must match exactly and every shape must agree with the widths read from the state dict; errors name the
parameter. Only diffusers-format keys are handled (not the original BFL `double_blocks.N.img_attn.qkv` layout).
LoRA parameters are not part of a pretrained block: merge the converted tree into a freshly initialized LoRA model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' so bf16 safetensors load)
import numpy as np
from safetensors import safe_open

BlockKind = Literal["double", "single"]

_DOUBLE_LINEARS = {
    # torch module -> (out features, in features) as functions of (dim, mlp_width)
    "norm1.linear": lambda d, m: (6 * d, d),
    "norm1_context.linear": lambda d, m: (6 * d, d),
    "attn.to_q": lambda d, m: (d, d),
    "attn.to_k": lambda d, m: (d, d),
    "attn.to_v": lambda d, m: (d, d),
    "attn.add_q_proj": lambda d, m: (d, d),
    "attn.add_k_proj": lambda d, m: (d, d),
    "attn.add_v_proj": lambda d, m: (d, d),
    "attn.to_out.0": lambda d, m: (d, d),
    "attn.to_add_out": lambda d, m: (d, d),
    "ff.net.0.proj": lambda d, m: (m, d),
    "ff.net.2": lambda d, m: (d, m),
    "ff_context.net.0.proj": lambda d, m: (m, d),
    "ff_context.net.2": lambda d, m: (d, m),
}
_DOUBLE_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")

_SINGLE_LINEARS = {
    "norm.linear": lambda d, m: (3 * d, d),
    "attn.to_q": lambda d, m: (d, d),
    "attn.to_k": lambda d, m: (d, d),
    "attn.to_v": lambda d, m: (d, d),
    "proj_mlp": lambda d, m: (m, d),
    "proj_out": lambda d, m: (d, d + m),
}
_SINGLE_NORMS = ("attn.norm_q", "attn.norm_k")

# (key holding the model width in dim 1, key holding the MLP width in dim 0) per block kind.
_WIDTH_KEYS = {
    "double": ("norm1.linear.weight", "ff.net.0.proj.weight"),
    "single": ("norm.linear.weight", "proj_mlp.weight"),
}


def _flax_path(torch_module: str) -> tuple[str, ...]:
    """`attn.to_out.0` -> ('attn', 'to_out_0'): a numeric component joins the one before it."""
    path: list[str] = []
    for part in torch_module.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def _expected_shapes(kind: BlockKind, dim: int, head_dim: int, mlp_width: int) -> dict[str, tuple[int, ...]]:
    linears, norms = (_DOUBLE_LINEARS, _DOUBLE_NORMS) if kind == "double" else (_SINGLE_LINEARS, _SINGLE_NORMS)
    shapes: dict[str, tuple[int, ...]] = {}
    for module, shape_fn in linears.items():
        out_features, in_features = shape_fn(dim, mlp_width)
        shapes[f"{module}.weight"] = (out_features, in_features)
        shapes[f"{module}.bias"] = (out_features,)
    for module in norms:
        shapes[f"{module}.weight"] = (head_dim,)
    return shapes


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise KeyError(f"Flux block state dict is missing '{key}'")
    return tuple(np.shape(state_dict[key]))


def torch_state_dict_to_flax(
    state_dict: Mapping[str, np.ndarray], kind: BlockKind, *, dtype: Any = None
) -> dict[str, Any]:
    """Converts one diffusers Flux block's state dict into a Flax 'params' tree.

    Args:
      state_dict: block-relative keys (`attn.to_q.weight`, ...) to arrays (NumPy, or anything `np.asarray` takes).
      kind: 'double' (`FluxTransformerBlock` -> `DoubleStreamBlock`) or 'single' (`FluxSingleTransformerBlock` ->
        `SingleStreamBlock`).
      dtype: optional dtype to cast every parameter to (default: keep the stored dtype).

    Returns:
      The nested params dict (without the outer {'params': ...}).

    Raises:
      ValueError: unknown kind, missing/unexpected keys, or a shape that disagrees with the block's widths.
    """
    if kind not in _WIDTH_KEYS:
        raise ValueError(f"kind must be 'double' or 'single', got {kind!r}")
    width_key, mlp_key = _WIDTH_KEYS[kind]
    dim = _shape_of(state_dict, width_key)[-1]
    mlp_width = _shape_of(state_dict, mlp_key)[0]
    head_dim = _shape_of(state_dict, "attn.norm_q.weight")[0]
    if dim % head_dim:
        raise ValueError(f"'attn.norm_q.weight' has head dim {head_dim}, which does not divide the width {dim}")
    expected = _expected_shapes(kind, dim, head_dim, mlp_width)

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{kind} Flux block state dict: missing keys {missing}, unexpected keys {unexpected}")

    params: dict[str, Any] = {}
    for key, want in expected.items():
        array = np.asarray(state_dict[key])
        if array.shape != want:
            raise ValueError(f"parameter '{key}' has shape {array.shape}, expected {want} (width {dim})")
        module, leaf = key.rsplit(".", 1)
        if leaf == "bias":
            name, value = "bias", array
        elif array.ndim == 2:
            name, value = "kernel", array.T  # [out, in] -> [in, out]
        else:
            name, value = "scale", array  # RMSNorm weight
        if dtype is not None:
            value = value.astype(dtype)
        node = params
        for part in _flax_path(module):
            node = node.setdefault(part, {})
        node[name] = np.ascontiguousarray(value)
    return params


def load_safetensors_block(
    path: str | os.PathLike, prefix: str, kind: BlockKind, *, dtype: Any = None
) -> dict[str, Any]:
    """Reads the tensors under `prefix` from a local safetensors file and converts them with `torch_state_dict_to_flax`.

    Only the block's tensors are read (lazily, through `safetensors.safe_open` with the NumPy backend, never
    pickle), so one block of a multi-GB transformer checkpoint costs only its own size in memory.

    Args:
      path: a `.safetensors` file, e.g. diffusers' `transformer/diffusion_pytorch_model-00001-of-00003.safetensors`.
      prefix: key prefix of the block, e.g. 'transformer_blocks.0.' or 'single_transformer_blocks.5.' (a missing
        trailing '.' is added).
      kind: 'double' or 'single'.
      dtype: optional dtype to cast the parameters to.

    Returns:
      The block's params tree.
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {os.fspath(path)!r}")
    state_dict: dict[str, np.ndarray] = {}
    with safe_open(os.fspath(path), framework="np") as reader:
        for key in reader.keys():
            if key.startswith(prefix):
                state_dict[key[len(prefix) :]] = reader.get_tensor(key)
    if not state_dict:
        raise KeyError(f"no tensors with prefix {prefix!r} in {os.fspath(path)!r}")
    return torch_state_dict_to_flax(state_dict, kind, dtype=dtype)
