"""Methods as objectives. `build_objective(config)` maps `config.method` to an `Objective` for the trainer."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from editing_jax.train.objective import Objective

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def module_kwargs(model_config) -> dict:
    """ConfigDict -> module constructor kwargs: lists become tuples, dtype names become dtypes."""
    kwargs = {}
    for key, value in model_config.items():
        if isinstance(value, list):
            value = tuple(value)
        if key in ("dtype", "param_dtype"):
            if value not in _DTYPES:
                raise ValueError(f"model.{key} must be one of {', '.join(_DTYPES)}, got {value!r}")
            value = _DTYPES[value]
        kwargs[key] = value
    return kwargs


def _tokenizer_vq(config) -> Objective:
    from editing_jax.methods import tokenizer
    from editing_jax.models.vq import VQModel

    return tokenizer.make_vq_objective(VQModel(**module_kwargs(config.model)), **dict(config.loss))


def _tokenizer_kl(config) -> Objective:
    from editing_jax.methods import tokenizer
    from editing_jax.models.autoencoder import AutoencoderKL

    return tokenizer.make_kl_objective(AutoencoderKL(**module_kwargs(config.model)), **dict(config.loss))


def _editmgt(config) -> Objective:
    from editing_jax.methods import editmgt

    return editmgt.build_objective(config)


def _flow_edit(config) -> Objective:
    from editing_jax.methods import flow_edit

    return flow_edit.build_objective(config)


def _flow_grpo(config) -> Objective:
    from editing_jax.methods import grpo

    return grpo.build_objective(config)


METHODS: dict[str, Callable[..., Objective]] = {
    "tokenizer_vq": _tokenizer_vq,
    "tokenizer_kl": _tokenizer_kl,
    "editmgt": _editmgt,
    "flow_edit": _flow_edit,
    "flow_grpo": _flow_grpo,
}


def build_objective(config) -> Objective:
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[config.method](config)
