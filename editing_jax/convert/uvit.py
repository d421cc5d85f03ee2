"""diffusers / Meissonic token-grid module weights -> `editing_jax.nn.uvit` parameter trees.

Each function takes one module's state dict (keys relative to the module, arrays as NumPy or anything `np.asarray`
takes) and returns the Flax 'params' tree of the matching `editing_jax.nn.uvit` module:

  * `UVit2DConvEmbed` -> `ConvEmbed`: 1x1 `conv.weight [O, I, 1, 1]` -> Dense `conv/kernel [I, O]`;
  * `ConvMlmLayer` -> `ConvMlmLayer`: `conv1` / `conv2` likewise;
  * `Downsample2D(use_conv=True, kernel_size=2, padding=0, norm_type='rms_norm')` -> `Downsample`:
    `conv.weight [O, I, 2, 2]` -> `conv/kernel [2, 2, I, O]`;
  * `Upsample2D(use_conv_transpose=True, kernel_size=2, padding=0, norm_type='rms_norm')` -> `Upsample`:
    `ConvTranspose2d` `conv.weight [I, O, 2, 2]` -> `kernel [I, 2, 2, O]`.

RMSNorm `weight` -> `scale`; an RMSNorm built with `elementwise_affine=False` has no weight and becomes a scale of
ones (our norms always carry a scale). Biases are copied when present (`use_bias=True` models). Missing or unexpected
keys and shapes that disagree with the module's widths raise `ValueError` naming the key.

`mgt_embed_and_head_from_torch` pulls all four out of a Meissonic / EditMGT `Transformer2DModel` state dict
(`embed.*`, `mlm_layer.*`, `down_block.downsample.*`, `up_block.upsample.*`) into the subtrees of
`editing_jax.models.mgt.MaskedGenerativeTransformer` ('embed', 'mlm_layer', 'down_block', 'up_block').
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "conv_embed_from_torch",
    "conv_mlm_layer_from_torch",
    "downsample_from_torch",
    "mgt_embed_and_head_from_torch",
    "upsample_from_torch",
]


def _take(state_dict: Mapping[str, Any], key: str, ndim: int, what: str) -> np.ndarray:
    if key not in state_dict:
        raise ValueError(f"{what} state dict is missing '{key}' (has {sorted(state_dict)})")
    array = np.asarray(state_dict[key])
    if array.ndim != ndim:
        raise ValueError(f"{what} parameter '{key}' has shape {array.shape}, expected {ndim} dimensions")
    return array


def _check_keys(state_dict: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unexpected = sorted(set(state_dict) - allowed)
    if unexpected:
        raise ValueError(f"{what} state dict has unexpected keys {unexpected}")


def _check_shape(array: np.ndarray, want: tuple[int, ...], key: str, what: str) -> None:
    if array.shape != want:
        raise ValueError(f"{what} parameter '{key}' has shape {array.shape}, expected {want}")


def _cast(tree: dict[str, Any], dtype: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[name] = _cast(value, dtype)
        else:
            out[name] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
    return out


def _rms_norm(state_dict: Mapping[str, Any], module: str, dim: int, what: str, dtype_like: np.ndarray) -> dict:
    """RMSNorm `weight [dim]` -> {'scale'}; ones when the norm has no affine weight."""
    key = f"{module}.weight"
    if key not in state_dict:
        return {"scale": np.ones((dim,), dtype_like.dtype)}
    scale = _take(state_dict, key, 1, what)
    _check_shape(scale, (dim,), key, what)
    return {"scale": scale}


def _pointwise(state_dict: Mapping[str, Any], module: str, what: str) -> dict:
    """1x1 `Conv2d.weight [O, I, 1, 1]` (+ bias) -> Dense {'kernel' [I, O], 'bias'}."""
    weight = _take(state_dict, f"{module}.weight", 4, what)
    if weight.shape[2:] != (1, 1):
        raise ValueError(f"{what} parameter '{module}.weight' has shape {weight.shape}, expected a 1x1 conv")
    out = {"kernel": weight[:, :, 0, 0].T}
    bias_key = f"{module}.bias"
    if bias_key in state_dict:
        bias = _take(state_dict, bias_key, 1, what)
        _check_shape(bias, (weight.shape[0],), bias_key, what)
        out["bias"] = bias
    return out


def conv_embed_from_torch(state_dict: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """`UVit2DConvEmbed` state dict -> `ConvEmbed` params.

    Args:
      state_dict: `embeddings.weight [V, E]`, `layer_norm.weight [E]` (absent without affine), `conv.weight
        [D, E, 1, 1]`, optional `conv.bias [D]`.
      dtype: optional dtype to cast every parameter to (default: keep the stored dtype).

    Returns:
      {'embeddings': {'embedding'}, 'layer_norm': {'scale'}, 'conv': {'kernel', ['bias']}}.
    """
    what = "UVit2DConvEmbed"
    _check_keys(state_dict, {"embeddings.weight", "layer_norm.weight", "conv.weight", "conv.bias"}, what)
    table = _take(state_dict, "embeddings.weight", 2, what)
    conv = _pointwise(state_dict, "conv", what)
    _check_shape(conv["kernel"], (table.shape[1], conv["kernel"].shape[1]), "conv.weight", what)
    params = {
        "embeddings": {"embedding": table},
        "layer_norm": _rms_norm(state_dict, "layer_norm", table.shape[1], what, table),
        "conv": conv,
    }
    return _cast(params, dtype)


def conv_mlm_layer_from_torch(state_dict: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """diffusers `ConvMlmLayer` state dict -> `ConvMlmLayer` params.

    Args:
      state_dict: `conv1.weight [E, D, 1, 1]`, `layer_norm.weight [E]` (absent without affine), `conv2.weight
        [V, E, 1, 1]`, optional `conv1.bias`/`conv2.bias`.
      dtype: optional dtype to cast every parameter to.

    Returns:
      {'conv1': {'kernel', ['bias']}, 'layer_norm': {'scale'}, 'conv2': {'kernel', ['bias']}}.
    """
    what = "ConvMlmLayer"
    _check_keys(state_dict, {"conv1.weight", "conv1.bias", "layer_norm.weight", "conv2.weight", "conv2.bias"}, what)
    conv1 = _pointwise(state_dict, "conv1", what)
    conv2 = _pointwise(state_dict, "conv2", what)
    hidden = conv1["kernel"].shape[1]
    _check_shape(conv2["kernel"], (hidden, conv2["kernel"].shape[1]), "conv2.weight", what)
    params = {
        "conv1": conv1,
        "layer_norm": _rms_norm(state_dict, "layer_norm", hidden, what, conv1["kernel"]),
        "conv2": conv2,
    }
    return _cast(params, dtype)


def _norm_then_conv(state_dict: Mapping[str, Any], what: str) -> tuple[np.ndarray, dict[str, Any]]:
    _check_keys(state_dict, {"norm.weight", "norm.bias", "conv.weight", "conv.bias"}, what)
    if "norm.bias" in state_dict:
        raise ValueError(f"{what}: RMSNorm with a bias ('norm.bias') is not supported by our RMSNorm")
    weight = _take(state_dict, "conv.weight", 4, what)
    if weight.shape[2:] != (2, 2):
        raise ValueError(f"{what} parameter 'conv.weight' has shape {weight.shape}, expected a 2x2 kernel")
    if weight.shape[0] != weight.shape[1]:
        raise ValueError(f"{what} parameter 'conv.weight' has shape {weight.shape}: in and out channels must agree")
    channels = weight.shape[0]
    params: dict[str, Any] = {"norm": _rms_norm(state_dict, "norm", channels, what, weight)}
    if "conv.bias" in state_dict:
        bias = _take(state_dict, "conv.bias", 1, what)
        _check_shape(bias, (channels,), "conv.bias", what)
        params["bias"] = bias
    return weight, params


def downsample_from_torch(state_dict: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """`Downsample2D(use_conv=True, kernel_size=2, padding=0, norm_type='rms_norm')` state dict -> `Downsample`.

    Args:
      state_dict: `norm.weight [C]` (absent without affine), `conv.weight [C, C, 2, 2]`, optional `conv.bias [C]`.
      dtype: optional dtype to cast every parameter to.

    Returns:
      {'norm': {'scale'}, 'conv': {'kernel' [2, 2, C, C], ['bias']}}.
    """
    weight, params = _norm_then_conv(state_dict, "Downsample2D")
    conv = {"kernel": weight.transpose(2, 3, 1, 0)}  # [O, I, kh, kw] -> [kh, kw, I, O]
    if "bias" in params:
        conv["bias"] = params.pop("bias")
    params["conv"] = conv
    return _cast(params, dtype)


def upsample_from_torch(state_dict: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """`Upsample2D(use_conv_transpose=True, kernel_size=2, padding=0, norm_type='rms_norm')` state dict -> `Upsample`.

    Args:
      state_dict: `norm.weight [C]` (absent without affine), `conv.weight [C_in, C_out, 2, 2]` (a `ConvTranspose2d`),
        optional `conv.bias [C]`.
      dtype: optional dtype to cast every parameter to.

    Returns:
      {'norm': {'scale'}, 'kernel' [C_in, 2, 2, C_out], ['bias']}.
    """
    weight, params = _norm_then_conv(state_dict, "Upsample2D")
    params["kernel"] = weight.transpose(0, 2, 3, 1)  # [I, O, kh, kw] -> [I, kh, kw, O]
    return _cast(params, dtype)


def _submodule(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def mgt_embed_and_head_from_torch(
    state_dict: Mapping[str, Any], prefix: str = "", *, codebook_size: int | None = None, dtype: Any = None
) -> dict[str, Any]:
    """The token-grid modules of a Meissonic / EditMGT `Transformer2DModel` state dict, as our MGT's subtrees.

    Args:
      state_dict: the whole transformer state dict (other keys are ignored).
      prefix: prefix of the transformer's keys, e.g. 'transformer.' (a missing trailing '.' is added).
      codebook_size: our model's codebook size V. Meissonic's embedding table has `vocab_size` rows (8256 for
        V = 8192) with the mask token at `vocab_size - 1`, while ours has V + 1 rows with the mask token at V. When
        given and the table is larger, rows [0, V) are kept and row `vocab_size - 1` becomes our mask row V.
      dtype: optional dtype to cast every parameter to.

    Returns:
      {'embed': ..., 'mlm_layer': ...} plus 'down_block' / 'up_block' when the checkpoint has them
      (`downsample=True` / `upsample=True` models).
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    out = {
        "embed": conv_embed_from_torch(_submodule(state_dict, f"{prefix}embed."), dtype=dtype),
        "mlm_layer": conv_mlm_layer_from_torch(_submodule(state_dict, f"{prefix}mlm_layer."), dtype=dtype),
    }
    down = _submodule(state_dict, f"{prefix}down_block.downsample.")
    if down:
        out["down_block"] = downsample_from_torch(down, dtype=dtype)
    up = _submodule(state_dict, f"{prefix}up_block.upsample.")
    if up:
        out["up_block"] = upsample_from_torch(up, dtype=dtype)

    table = out["embed"]["embeddings"]["embedding"]
    logits = out["mlm_layer"]["conv2"]["kernel"].shape[1]
    if codebook_size is not None:
        if logits != codebook_size:
            raise ValueError(f"mlm_layer predicts {logits} codes, but codebook_size is {codebook_size}")
        if table.shape[0] < codebook_size + 1:
            raise ValueError(f"embedding table has {table.shape[0]} rows, fewer than codebook_size + 1")
        if table.shape[0] > codebook_size + 1:
            out["embed"]["embeddings"]["embedding"] = np.concatenate([table[:codebook_size], table[-1:]], axis=0)
    return out
