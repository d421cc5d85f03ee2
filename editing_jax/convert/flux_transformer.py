"""diffusers `FluxTransformer2DModel` weights -> `editing_jax.models.flow_dit.FlowDiT` parameter trees.

Keys under `transformer_blocks.N.` / `single_transformer_blocks.N.` are converted block by block with
`editing_jax.convert.flux_blocks` (into `transformer_blocks_N` / `single_transformer_blocks_N`); the remaining
top-level Linears (`x_embedder`, `context_embedder`, `time_text_embed.*`, `norm_out.linear`, `proj_out`) follow the
same rule: `weight [out, in]` -> `kernel [in, out]`, list indices joined with `_`. The guidance embedder is optional
(present in guidance-distilled checkpoints such as FLUX.1-dev / Kontext-dev). Key sets must match exactly, block
indices must be contiguous from 0, and every shape must agree with the model width (`x_embedder.weight` rows); errors
name the parameter. Only diffusers-format keys are handled (not the original BFL `double_blocks.N.img_attn.qkv` layout).

`load_safetensors` reads a local `.safetensors` file or a directory of shards (diffusers' `transformer/` folder) one
block at a time, so peak host memory is the converted tree plus one block. `flow_dit_kwargs` maps diffusers'
`config.json` to `FlowDiT` fields.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import numpy as np
from safetensors import safe_open

from editing_jax.convert import flux_blocks

_BLOCK_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BLOCK_KINDS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
# diffusers' Timesteps(num_channels=256) in front of the timestep/guidance MLPs.
TIMESTEP_CHANNELS = 256

# Top-level Linear -> (out features, in features); None = read from the tensor (the free input/output widths).
_TOP_LINEARS: dict[str, Callable[[int], tuple[int | None, int | None]]] = {
    "x_embedder": lambda d: (d, None),
    "context_embedder": lambda d: (d, None),
    "time_text_embed.timestep_embedder.linear_1": lambda d: (d, TIMESTEP_CHANNELS),
    "time_text_embed.timestep_embedder.linear_2": lambda d: (d, d),
    "time_text_embed.text_embedder.linear_1": lambda d: (d, None),
    "time_text_embed.text_embedder.linear_2": lambda d: (d, d),
    "norm_out.linear": lambda d: (2 * d, d),
    "proj_out": lambda d: (None, d),
}
_GUIDANCE_LINEARS: dict[str, Callable[[int], tuple[int | None, int | None]]] = {
    "time_text_embed.guidance_embedder.linear_1": lambda d: (d, TIMESTEP_CHANNELS),
    "time_text_embed.guidance_embedder.linear_2": lambda d: (d, d),
}


def _split_keys(keys) -> tuple[list[str], dict[tuple[str, int], list[str]]]:
    """Top-level keys, and block keys grouped by (list name, index)."""
    top: list[str] = []
    blocks: dict[tuple[str, int], list[str]] = {}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault((match.group(1), int(match.group(2))), []).append(key)
        else:
            top.append(key)
    for list_name in _BLOCK_KINDS:
        indices = sorted(index for name, index in blocks if name == list_name)
        if indices != list(range(len(indices))):
            raise ValueError(f"'{list_name}' indices must run 0..N-1, got {indices}")
    return top, blocks


def _convert_top(get: Callable[[str], np.ndarray], keys: list[str], dtype: Any) -> dict[str, Any]:
    """Converts the top-level Linears; `get(key)` returns a tensor."""
    if "x_embedder.weight" not in keys:
        raise ValueError("Flux transformer state dict is missing 'x_embedder.weight'")
    linears = dict(_TOP_LINEARS)
    if any(key.startswith("time_text_embed.guidance_embedder.") for key in keys):
        linears.update(_GUIDANCE_LINEARS)
    expected = {f"{module}.{leaf}" for module in linears for leaf in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(keys)), sorted(set(keys) - expected)
    if missing or unexpected:
        raise ValueError(f"Flux transformer state dict: missing keys {missing}, unexpected keys {unexpected}")

    params: dict[str, Any] = {}
    dim = None
    for module, shape_fn in linears.items():
        weight = np.asarray(get(f"{module}.weight"))
        bias = np.asarray(get(f"{module}.bias"))
        if dim is None:
            dim = weight.shape[0]  # x_embedder comes first: its rows are the model width
        want_out, want_in = shape_fn(dim)
        want = (weight.shape[0] if want_out is None else want_out, weight.shape[-1] if want_in is None else want_in)
        if weight.shape != want:
            raise ValueError(f"parameter '{module}.weight' has shape {weight.shape}, expected {want} (width {dim})")
        if bias.shape != (want[0],):
            raise ValueError(f"parameter '{module}.bias' has shape {bias.shape}, expected {(want[0],)}")
        kernel = weight.T  # [out, in] -> [in, out]
        if dtype is not None:
            kernel, bias = kernel.astype(dtype), bias.astype(dtype)
        node = params
        for part in flux_blocks._flax_path(module):
            node = node.setdefault(part, {})
        node["kernel"] = np.ascontiguousarray(kernel)
        node["bias"] = np.ascontiguousarray(bias)
    return params


def _check_block_width(name: str, block: Mapping[str, Any], dim: int) -> None:
    width = block["attn"]["to_q"]["kernel"].shape[0]
    if width != dim:
        raise ValueError(f"block '{name}' has width {width}, but 'x_embedder.weight' gives the model width {dim}")


def _convert(get: Callable[[str], np.ndarray], keys, dtype: Any) -> dict[str, Any]:
    top_keys, block_keys = _split_keys(keys)
    params = _convert_top(get, top_keys, dtype)
    dim = params["x_embedder"]["kernel"].shape[1]
    head_dims = set()
    for (list_name, index), group in sorted(block_keys.items()):
        prefix = f"{list_name}.{index}."
        name = f"{list_name}_{index}"
        try:
            block = flux_blocks.torch_state_dict_to_flax(
                {key[len(prefix) :]: get(key) for key in group}, _BLOCK_KINDS[list_name], dtype=dtype
            )
        except (KeyError, ValueError) as error:
            raise ValueError(f"in '{prefix[:-1]}': {error}") from error
        _check_block_width(name, block, dim)
        head_dims.add(block["attn"]["norm_q"]["scale"].shape[0])
        params[name] = block
    if len(head_dims) > 1:
        raise ValueError(f"blocks disagree on the attention head dim: {sorted(head_dims)}")
    return params


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """Converts a diffusers `FluxTransformer2DModel` state dict into a `FlowDiT` 'params' tree.

    Args:
      state_dict: diffusers keys (`x_embedder.weight`, `transformer_blocks.0.attn.to_q.weight`, ...) to arrays
        (NumPy, or anything `np.asarray` takes, e.g. CPU torch tensors via `.numpy()`).
      dtype: optional dtype to cast every parameter to (default: keep the stored dtype).

    Returns:
      The nested params dict (without the outer {'params': ...}).

    Raises:
      ValueError: missing/unexpected keys, non-contiguous block indices, or a shape that disagrees with the widths.
    """
    return _convert(lambda key: np.asarray(state_dict[key]), list(state_dict), dtype)


def _safetensors_files(path: str | os.PathLike) -> list[str]:
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in the directory {path!r}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file or directory at {path!r}")
    return [path]


def load_safetensors(path: str | os.PathLike, *, dtype: Any = None) -> dict[str, Any]:
    """Loads a `FlowDiT` params tree from local diffusers-format safetensors (NumPy backend, never pickle).

    Args:
      path: a `.safetensors` file, or a directory whose `*.safetensors` files are the shards of one checkpoint
        (diffusers' `transformer/` folder with `diffusion_pytorch_model-0000N-of-0000M.safetensors`).
      dtype: optional dtype to cast the parameters to (e.g. `np.float32` for bf16 checkpoints).

    Returns:
      The params tree, as `torch_state_dict_to_flax`.

    Raises:
      FileNotFoundError: the path holds no safetensors; ValueError: a key in two shards, or a conversion error.
    """
    files = _safetensors_files(path)
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(file, framework="np")) for file in files]
        owner: dict[str, Any] = {}
        for file, reader in zip(files, readers, strict=True):
            for key in reader.keys():
                if key in owner:
                    raise ValueError(f"tensor '{key}' appears in more than one shard (second: {file!r})")
                owner[key] = reader
        return _convert(lambda key: owner[key].get_tensor(key), list(owner), dtype)


def flow_dit_kwargs(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """`FlowDiT` fields from a diffusers `FluxTransformer2DModel` config (a dict or the path of its config.json).

    Add `dtype`, `param_dtype` and LoRA fields yourself; `zero_init_*` do not matter for converted weights.
    """
    if not isinstance(config, Mapping):
        with open(config) as file:
            config = json.load(file)
    patch = config.get("patch_size", 1)
    in_channels = config.get("in_channels", 64)
    return dict(
        num_layers=config.get("num_layers", 19),
        num_single_layers=config.get("num_single_layers", 38),
        num_heads=config.get("num_attention_heads", 24),
        head_dim=config.get("attention_head_dim", 128),
        axes_dims_rope=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        out_channels=patch * patch * (config.get("out_channels") or in_channels),
        guidance_embeds=bool(config.get("guidance_embeds", False)),
    )
