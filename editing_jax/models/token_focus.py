"""CogniEdit's Dynamic Token Focus Relocation (paper eqs. 5-6): learned soft tokens placed at a predicted text window.

Before a transformer block, a lightweight predictor p_eta scores every text token from its hidden state
(LayerNorm -> Dense -> one logit per token); a window of xi consecutive tokens starting at s gets the mean score of
its tokens, and the start is chosen among the windows that lie inside the real (unpadded) text:

  pi = softmax(window_scores / temperature)            # [B, S], S = Lt - xi + 1 starts
  s* = argmax(pi)

The xi learnable soft tokens E [xi, D] then replace the text states at s*, ..., s* + xi - 1 (eq. 6).

Relaxation (the position choice must carry gradient; an argmax does not): with `relaxation='straight_through'` the
start weights are w = onehot(s*) + pi - stop_gradient(pi). The forward pass uses the hard one-hot, so exactly xi
tokens are replaced, and the backward pass differentiates the soft mixture sum_s pi_s * replace(s), which tells the
predictor how the loss would change if probability moved to another start. `relaxation='soft'` uses w = pi in both
passes (a convex mixture of all placements; smoother, but the forward pass then differs from the hard choice).

Replacement, for coverage c_j = sum_s w_s [s <= j < s + xi] and placed soft tokens P_j = sum_s w_s E[j - s]:

  text'_j = text_j + gate * (P_j - c_j * text_j)

With hard weights and gate = 1 this is exactly eq. 6 (text'_j = E[j - s*] inside the window, text_j outside). The
per-layer scalar gate is our addition: `gate_init=0` starts the module as the identity, so an RL run from an SFT base
starts at the SFT policy and the KL reference (gate 0, adapters zeroed) is the base exactly; `gate_init=1` is the
paper's hard replacement from the first step.

For analysis (the paper's Fig. 7) the module sows into 'intermediates': `focus_start` [B] int32 (s*), `start_probs`
[B, S] (pi) and `token_importance` [B, Lt] (softmax of the token scores over the real tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RELAXATIONS = ("straight_through", "soft")
_NEG = -1e9


def window_matrix(length: int, window: int) -> np.ndarray:
    """`[S, Lt]` float32 band: row s has ones at columns s, ..., s + window - 1 (S = length - window + 1)."""
    if not 1 <= window <= length:
        raise ValueError(f"the focus window must be in [1, text length {length}], got {window}")
    starts = np.arange(length - window + 1)[:, None]
    columns = np.arange(length)[None, :]
    return ((columns >= starts) & (columns < starts + window)).astype(np.float32)


def placement_tensor(length: int, window: int) -> np.ndarray:
    """`[S, Lt, xi]` float32: entry (s, j, q) is 1 iff soft token q lands on text position j for start s (j = s + q)."""
    num_starts = length - window + 1
    placement = np.zeros((num_starts, length, window), np.float32)
    for start in range(num_starts):
        placement[start, start + np.arange(window), np.arange(window)] = 1.0
    return placement


def relocate(text: jax.Array, soft_tokens: jax.Array, start_weights: jax.Array, gate: jax.Array) -> jax.Array:
    """Places `soft_tokens` over `text` at the (weighted) starts; see the module docstring.

    Args:
      text: `[B, Lt, D]` text hidden states.
      soft_tokens: `[xi, D]` learnable tokens E.
      start_weights: `[B, S]` weights of the S = Lt - xi + 1 starts (one-hot for a hard choice).
      gate: scalar blend (1 = eq. 6's replacement).

    Returns:
      `[B, Lt, D]`.
    """
    length, window = text.shape[1], soft_tokens.shape[0]
    band = jnp.asarray(window_matrix(length, window), text.dtype)  # [S, Lt]
    placement = jnp.asarray(placement_tensor(length, window), text.dtype)  # [S, Lt, xi]
    weights = start_weights.astype(text.dtype)
    coverage = weights @ band  # [B, Lt]
    placed = jnp.einsum("bs,sjq,qd->bjd", weights, placement, soft_tokens.astype(text.dtype))  # [B, Lt, D]
    return text + gate.astype(text.dtype) * (placed - coverage[..., None] * text)


class TokenFocus(nn.Module):
    """One layer's token-focus relocation: predictor p_eta, soft tokens E and gate (see the module docstring).

    Attributes:
      num_tokens: xi, the soft tokens placed per layer.
      relaxation: 'straight_through' (hard forward, soft backward) or 'soft'.
      temperature: softmax temperature of the start distribution.
      gate_init: initial gate (0 = identity at init, 1 = the paper's replacement).
    """

    num_tokens: int = 4
    relaxation: str = "straight_through"
    temperature: float = 1.0
    gate_init: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text: jax.Array, text_mask: jax.Array | None = None) -> jax.Array:
        """text `[B, Lt, D]`, text_mask `[B, Lt]` bool (None = every position is a token) -> `[B, Lt, D]`."""
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        batch, length, width = text.shape
        window = self.num_tokens
        band = jnp.asarray(window_matrix(length, window))  # [S, Lt]
        mask = jnp.ones((batch, length), bool) if text_mask is None else text_mask.astype(bool)

        normed = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="predictor_norm")(text)
        scores = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="predictor")(normed)[..., 0]
        scores = scores.astype(jnp.float32)  # [B, Lt]
        window_scores = scores @ band.T / window  # [B, S]
        inside = (mask.astype(jnp.float32) @ band.T) >= window  # [B, S]: the window covers only real tokens
        # Texts shorter than the window (e.g. the empty CFG text) fall back to start 0.
        inside = inside | (~jnp.any(inside, axis=-1, keepdims=True) & (jnp.arange(band.shape[0]) == 0))
        probs = jax.nn.softmax(jnp.where(inside, window_scores / self.temperature, _NEG), axis=-1)  # [B, S]
        start = jnp.argmax(probs, axis=-1)  # [B]
        if self.relaxation == "straight_through":
            hard = jax.nn.one_hot(start, probs.shape[-1], dtype=probs.dtype)  # [B, S]
            weights = hard + probs - jax.lax.stop_gradient(probs)
        else:
            weights = probs

        soft_tokens = self.param(
            "soft_tokens", nn.initializers.normal(0.02), (window, width), self.param_dtype
        )  # [xi, D]
        gate = self.param("gate", nn.initializers.constant(self.gate_init), (), self.param_dtype)

        importance = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)  # [B, Lt]
        self.sow("intermediates", "focus_start", start.astype(jnp.int32))
        self.sow("intermediates", "start_probs", probs)
        self.sow("intermediates", "token_importance", importance)
        return relocate(text, soft_tokens, weights, gate)


def focus_module_name(layer: int) -> str:
    """Scope name of block `layer`'s token-focus module inside `FlowDiT`."""
    return f"token_focus_{layer}"


def collect_focus(intermediates: Mapping[str, Any], layers) -> dict[str, jax.Array]:
    """Stacks the sown analysis arrays of `layers` (see `FlowDiT.token_focus_layers`).

    Returns:
      {'focus_start': [N, B] int32, 'start_probs': [N, B, S], 'token_importance': [N, B, Lt]} for N layers.
    """
    out = {}
    for key in ("focus_start", "start_probs", "token_importance"):
        values = []
        for layer in layers:
            name = focus_module_name(layer)
            if name not in intermediates or key not in intermediates[name]:
                raise KeyError(f"no {key} sown for {name}; run the model with mutable=['intermediates']")
            values.append(intermediates[name][key][0])
        out[key] = jnp.stack(values)
    return out


def is_focus_path(path: tuple[Any, ...]) -> bool:
    """Whether a param tree path lies inside a token-focus module."""
    return any(isinstance(e, jax.tree_util.DictKey) and str(e.key).startswith("token_focus_") for e in path)
