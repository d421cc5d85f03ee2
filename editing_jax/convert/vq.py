"""diffusers `VQModel` checkpoints -> `editing_jax.models.vq.VQModel` variables.

Architecture correspondence (checked numerically by `tests/test_vq_parity.py`): a diffusers `VQModel` with
  act_fn='silu', norm_type='group', down_block_types all 'DownEncoderBlock2D', up_block_types all 'UpDecoderBlock2D'
is our `VQModel` with `use_mid_block=True`, `mid_block_attention=mid_block_add_attention`,
`codebook_size=num_vq_embeddings`, `code_dim=vq_embed_dim or latent_channels` and `l2_normalize_codes=False` (the
other trunk fields carry over by name). `vq_model_kwargs_from_diffusers_config` / `diffusers_vq_config` translate
between the two configurations and reject what has no counterpart:
  * diffusers `norm_type='spatial'` (MoVQ: the decoder's norms are conditioned on the quantized latents) and other
    block types or activations: not implemented here;
  * our `use_mid_block=False` (diffusers always has the mid block) and `l2_normalize_codes=True` (cosine lookup;
    diffusers looks up by L2 distance): no diffusers counterpart.
Config fields without effect on the network are ignored: `sample_size`, `scaling_factor` (a latent-diffusion
convention), `force_upcast` (a pipeline hint to run the VAE in float32), and `lookup_from_codebook` (whether
diffusers' `decode(..., force_not_quantize=True)` takes indices; our `decode_indices` always does).

Weights: the conv trunk goes through `editing_jax.convert.conv_trunk`; `quantize.embedding.weight [K, D]` becomes the
'state' collection's `quantize/codebook` (float32, as our quantizer always computes in float32) with fresh EMA
statistics (`cluster_size` = `embed_sum` = 0, `usage` = 1), i.e. exactly the state a newly initialized model has
around that codebook: EMA fine-tuning then starts as documented in `VectorQuantizer`. Index remapping (diffusers
`remap`, a `quantize.used` buffer) is not supported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' so bf16 safetensors load)
import numpy as np
from safetensors import safe_open

from editing_jax.convert.conv_trunk import check_tree, torch_conv_state_dict_to_flax
from editing_jax.models.vq import VQModel

__all__ = [
    "diffusers_vq_config",
    "load_pretrained_vq",
    "load_safetensors_vq",
    "vq_model_kwargs_from_diffusers_config",
    "vq_variables_from_torch",
]

CODEBOOK_KEY = "quantize.embedding.weight"
_DOWN_BLOCK, _UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"


def vq_model_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our `VQModel` keyword arguments for a diffusers `VQModel` config (e.g. its `config.json` as a dict).

    Args:
      config: diffusers `VQModel` config; missing fields take diffusers' defaults.

    Returns:
      Keyword arguments for `editing_jax.models.vq.VQModel` (training-only fields keep our defaults).

    Raises:
      ValueError: a configuration our model does not implement (see the module docstring).
    """
    block_out_channels = tuple(int(c) for c in config.get("block_out_channels", (64,)))
    down = tuple(config.get("down_block_types", (_DOWN_BLOCK,)))
    up = tuple(config.get("up_block_types", (_UP_BLOCK,)))
    if down != (_DOWN_BLOCK,) * len(block_out_channels) or up != (_UP_BLOCK,) * len(block_out_channels):
        raise ValueError(
            f"only {_DOWN_BLOCK}/{_UP_BLOCK} trunks with one block per entry of block_out_channels are supported, "
            f"got down_block_types={down}, up_block_types={up}, block_out_channels={block_out_channels}"
        )
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"only act_fn='silu' is supported, got {config['act_fn']!r}")
    if config.get("norm_type", "group") != "group":
        raise ValueError(f"only norm_type='group' is supported (no spatial norm), got {config['norm_type']!r}")
    latent_channels = int(config.get("latent_channels", 3))
    return dict(
        block_out_channels=block_out_channels,
        layers_per_block=int(config.get("layers_per_block", 1)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        use_mid_block=True,
        mid_block_attention=bool(config.get("mid_block_add_attention", True)),
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        latent_channels=latent_channels,
        codebook_size=int(config.get("num_vq_embeddings", 256)),
        code_dim=int(config.get("vq_embed_dim") or latent_channels),
        l2_normalize_codes=False,
    )


def diffusers_vq_config(model: VQModel) -> dict[str, Any]:
    """Keyword arguments for diffusers' `VQModel` that build the same network as `model`.

    `lookup_from_codebook=True` so diffusers' `decode(indices, force_not_quantize=True, shape=...)` decodes token
    indices like our `decode_indices`.

    Raises:
      ValueError: `model` uses a feature diffusers lacks (`use_mid_block=False`, `l2_normalize_codes=True`).
    """
    if not model.use_mid_block:
        raise ValueError("diffusers' VQModel always has a mid block: use_mid_block=False has no counterpart")
    if model.l2_normalize_codes:
        raise ValueError(
            "diffusers' VectorQuantizer looks up by L2 distance: l2_normalize_codes=True has no counterpart"
        )
    levels = len(model.block_out_channels)
    return dict(
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        down_block_types=(_DOWN_BLOCK,) * levels,
        up_block_types=(_UP_BLOCK,) * levels,
        block_out_channels=tuple(model.block_out_channels),
        layers_per_block=model.layers_per_block,
        act_fn="silu",
        latent_channels=model.latent_channels,
        num_vq_embeddings=model.codebook_size,
        norm_num_groups=model.norm_num_groups,
        vq_embed_dim=model.code_dim,
        norm_type="group",
        mid_block_add_attention=model.mid_block_attention,
        lookup_from_codebook=True,
        force_upcast=False,
    )


def _expected_variables(model: VQModel) -> dict[str, Any]:
    """Shapes of `model.init`'s unboxed variables (traced, not computed)."""
    size = model.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: nn.meta.unbox(model.init(jax.random.key(0), x)), images)


def vq_variables_from_torch(
    state_dict: Mapping[str, Any], *, model: VQModel | None = None, dtype: Any = None
) -> dict[str, Any]:
    """Converts a diffusers `VQModel` state dict into our `VQModel` variables.

    Args:
      state_dict: keys `encoder.*`, `quant_conv.*`, `quantize.embedding.weight`, `post_quant_conv.*`, `decoder.*` to
        arrays (NumPy, or anything `np.asarray` takes).
      model: when given, the result is checked against the names and shapes `model.init` creates, and a model with
        `l2_normalize_codes=True` is rejected (its lookup would differ from diffusers').
      dtype: optional dtype for the 'params' (the codebook always stays float32).

    Returns:
      {'params': ..., 'state': {'quantize': {'codebook', 'cluster_size', 'embed_sum', 'usage'}}}, ready for
      `model.apply`.

    Raises:
      ValueError: no codebook, unsupported `quantize.*` buffers, or (with `model`) a tree that does not fit.
    """
    if CODEBOOK_KEY not in state_dict:
        raise ValueError(f"VQModel state dict has no '{CODEBOOK_KEY}'")
    extra = sorted(key for key in state_dict if key.startswith("quantize.") and key != CODEBOOK_KEY)
    if extra:
        raise ValueError(f"unsupported quantizer entries {extra} (index remapping is not implemented)")
    if model is not None and model.l2_normalize_codes:
        raise ValueError(
            "diffusers' codebook is looked up by L2 distance: convert into a model with l2_normalize_codes=False"
        )

    codebook = np.asarray(state_dict[CODEBOOK_KEY]).astype(np.float32)  # [K, D]
    if codebook.ndim != 2:
        raise ValueError(f"'{CODEBOOK_KEY}' has shape {codebook.shape}, expected [num_codes, code_dim]")
    num_codes, code_dim = codebook.shape
    params = torch_conv_state_dict_to_flax(
        {key: value for key, value in state_dict.items() if not key.startswith("quantize.")}, dtype=dtype
    )
    variables = {
        "params": params,
        "state": {
            "quantize": {
                "codebook": np.ascontiguousarray(codebook),
                "cluster_size": np.zeros((num_codes,), np.float32),
                "embed_sum": np.zeros((num_codes, code_dim), np.float32),
                "usage": np.ones((num_codes,), np.float32),
            }
        },
    }
    if model is not None:
        check_tree(variables, _expected_variables(model), "VQModel")
    return variables


def load_safetensors_vq(
    path: str | os.PathLike, *, model: VQModel | None = None, prefix: str = "", dtype: Any = None
) -> dict[str, Any]:
    """Reads a diffusers `VQModel` from a local safetensors file (NumPy backend, never pickle) and converts it.

    Args:
      path: e.g. `vqvae/diffusion_pytorch_model.safetensors`.
      model: optional model to check the result against (see `vq_variables_from_torch`).
      prefix: key prefix of the VQ model inside the file (e.g. 'vqvae.'; a missing trailing '.' is added).
      dtype: optional dtype for the params.

    Returns:
      Our `VQModel` variables.
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {os.fspath(path)!r}")
    with safe_open(os.fspath(path), framework="np") as reader:
        state_dict = {key[len(prefix) :]: reader.get_tensor(key) for key in reader.keys() if key.startswith(prefix)}
    if not state_dict:
        raise KeyError(f"no tensors with prefix {prefix!r} in {os.fspath(path)!r}")
    return vq_variables_from_torch(state_dict, model=model, dtype=dtype)


def load_pretrained_vq(
    directory: str | os.PathLike, *, dtype: Any = None, **overrides: Any
) -> tuple[VQModel, dict[str, Any]]:
    """Builds our `VQModel` from a local diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`).

    Args:
      directory: e.g. a pipeline's `vqvae/` folder.
      dtype: optional dtype for the params.
      **overrides: extra `VQModel` fields (e.g. `dtype=jnp.bfloat16`, `dead_code_threshold=0.0`).

    Returns:
      (model, variables), checked against each other.
    """
    directory = os.fspath(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    model = VQModel(**{**vq_model_kwargs_from_diffusers_config(config), **overrides})
    weights = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    return model, load_safetensors_vq(weights, model=model, dtype=dtype)
