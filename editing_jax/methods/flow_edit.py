"""The flow editor (CogniEdit's base policy): a Flux/Kontext-style rectified-flow DiT on frozen KL latents.

Supervised fine-tuning (`configs/cogniedit/sft.py`), in the convention of `sampling.flow`: target latents x_0, noise
eps, x_t = (1 - t) x_0 + t eps (t = 1 is pure noise), and the DiT, given x_t, t, the instruction and the *clean*
source latents as Kontext reference tokens (appended along the sequence, position-id index 1), regresses the
velocity v = eps - x_0 with a mean squared error. Training times are drawn uniformly or logit-normally (SD3,
`loss.timestep_sampling`); the instruction is replaced by the empty text with probability `loss.cfg_dropout`, so the
model also learns the unconditional velocity used by classifier-free guidance.

Latent normalization: the DiT sees (z - shift) * scale of the autoencoder's posterior means z. When the KL run set
diffusers-style `scaling_factor` / `shift_factor` (anything but the defaults 1 and 0) those are used; otherwise
(the KL configs here leave them at the defaults) they are estimated once, at init, from the first training batch's
source and target images (scalar mean and 1 / std, as diffusers calibrates `scaling_factor`). Either way they are
stored in the model state as `latent_stats` = {'shift', 'scale'}, next to the frozen autoencoder variables
(`tokenizer`), so a checkpoint is self-contained; a run started with `init_from` keeps that run's statistics.

Editing is one compiled function (`make_edit_fn`): encode the source, integrate the probability-flow ODE from noise
with `sampling.flow.sample` (one `lax.scan`, optional classifier-free guidance batched with the unconditional pass),
decode. Its signature is EditMGT's, so `editmgt.run_edits` / `editmgt.evaluate_batches` and `editing-jax eval/edit`
drive both editors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.methods import editmgt
from editing_jax.methods.tokenizer import float_to_uint8, images_to_float
from editing_jax.models import token_focus
from editing_jax.models.autoencoder import AutoencoderKL
from editing_jax.models.flow_dit import FlowDiT, latent_image_ids, pack_latents, unpack_latents
from editing_jax.sampling import flow
from editing_jax.text.encoder import TextEncoder
from editing_jax.text.tokenizer import WordTokenizer
from editing_jax.train.objective import Batch, LossAux, Objective

PyTree = Any
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
MAX_VISUALIZED_ROWS = 8
# The settings the flow sampler reads; FlowSettings' other fields only keep `editmgt.run_edits` working.
SAMPLER_FIELDS = ("num_steps", "guidance_scale", "shift", "start_time")
_UNIFORM_EPS = 1e-3  # uniform training times are drawn from [eps, 1 - eps]


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """Inference settings of the flow editor.

    Attributes:
        num_steps: Euler steps from t = 1 to t = 0 (static: changes the compiled graph).
        guidance_scale: classifier-free guidance scale w, v = v_u + w (v_c - v_u); 0 turns guidance off (one pass).
        shift: SD3/Flux time shift of the sampling schedule (`sampling.flow.timesteps`); 1 is uniform.
        start_time: t in (0, 1] where the ODE starts: from x_t = (1 - t) source + t noise (the source's normalized
            latents, SDEdit / img2img), over the schedule scaled by t; 1 starts from pure noise (the default).
        region_hold_threshold, gamma, text_positions: EditMGT's settings, read by the shared `editmgt.run_edits`
            and ignored by the flow editor (always their neutral values).
    """

    num_steps: int = 20
    guidance_scale: float = 0.0
    shift: float = 1.0
    start_time: float = 1.0
    region_hold_threshold: float = 0.0
    gamma: float = 1.0
    text_positions: str = "all"

    @classmethod
    def from_config(cls, config, **overrides) -> FlowSettings:
        """Settings from a config's `sampling` section; `overrides` that are not None replace them.

        Raises:
            ValueError: num_steps < 1, shift <= 0, start_time outside (0, 1], or an override of a setting the flow
                editor does not have (e.g. EditMGT's `region_hold_threshold` from the command line).
        """
        editmgt.reject_unsupported(overrides, SAMPLER_FIELDS, "the flow editor", "EditMGT")
        values = {name: config.get(name, getattr(cls, name)) for name in SAMPLER_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(int(values["num_steps"]), float(values["guidance_scale"]), float(values["shift"]),
                       float(values["start_time"]))  # fmt: skip
        if settings.num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if settings.shift <= 0:
            raise ValueError(f"shift must be > 0, got {settings.shift}")
        if not 0.0 < settings.start_time <= 1.0:
            raise ValueError(f"start_time must be in (0, 1], got {settings.start_time}")
        return settings


@dataclasses.dataclass(frozen=True)
class FlowEditor:
    """The modules of a flow editor (stateless; parameters are passed in).

    params = {'dit': ..., 'text_encoder': ...}; model_state = {'tokenizer': frozen KL variables, 'latent_stats':
    {'shift': [], 'scale': []}}.

    Attributes:
        dit: the velocity model.
        text_encoder: instruction encoder (hidden states and a pooled vector).
        autoencoder: the frozen KL autoencoder.
        text_tokenizer: host-side word tokenizer.
        image_size: image side S in pixels.
        patch_size: latent patch per DiT token (Flux: 2).
    """

    dit: FlowDiT
    text_encoder: TextEncoder
    autoencoder: AutoencoderKL
    text_tokenizer: WordTokenizer
    image_size: int
    patch_size: int = 2

    @property
    def latent_grid(self) -> int:
        """Side h of the latent map."""
        return self.image_size // self.autoencoder.downsample_factor

    @property
    def token_grid(self) -> int:
        """Side of the packed token grid, h / patch_size."""
        return self.latent_grid // self.patch_size

    @property
    def token_channels(self) -> int:
        """Channels of a packed token, C * p * p."""
        return self.autoencoder.latent_channels * self.patch_size**2

    def image_ids(self, index: int) -> np.ndarray:
        """`[L, 3]` RoPE position ids of the target (index 0) or reference (index 1) tokens."""
        return latent_image_ids(self.token_grid, self.token_grid, index)

    def raw_latents(self, model_state: PyTree, images_uint8: jax.Array) -> jax.Array:
        """Posterior means of the frozen autoencoder (unnormalized).

        Args:
            model_state: holds 'tokenizer', the autoencoder variables.
            images_uint8: `[B, S, S, 3]` uint8.

        Returns:
            `[B, h, h, C]` float32.
        """
        variables = jax.lax.stop_gradient(model_state["tokenizer"])
        mean, _ = self.autoencoder.apply(variables, images_to_float(images_uint8), method=AutoencoderKL.encode)
        return mean

    def encode(self, model_state: PyTree, images_uint8: jax.Array) -> jax.Array:
        """uint8 images `[B, S, S, 3]` -> normalized packed latents `[B, L, C * p * p]` (L = token_grid^2)."""
        stats = model_state["latent_stats"]
        latents = (self.raw_latents(model_state, images_uint8) - stats["shift"]) * stats["scale"]  # [B, h, h, C]
        return pack_latents(latents, self.patch_size)

    def decode(self, model_state: PyTree, packed: jax.Array) -> jax.Array:
        """Normalized packed latents `[B, L, C * p * p]` -> uint8 images `[B, S, S, 3]`."""
        stats = model_state["latent_stats"]
        latents = unpack_latents(packed, self.latent_grid, self.latent_grid, self.patch_size)  # [B, h, h, C]
        latents = latents / stats["scale"] + stats["shift"]
        images = self.autoencoder.apply(model_state["tokenizer"], latents, method=AutoencoderKL.decode)
        return float_to_uint8(images)

    def encode_text(self, params: PyTree, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encodes token ids `[B, Lt]` (mask `[B, Lt]` bool).

        Returns:
            (hidden `[B, Lt, D_text]` with padded positions zeroed, since the DiT attends without a text mask,
            pooled `[B, P]`, mask `[B, Lt]` bool: only token focus reads it).
        """
        hidden, pooled = self.text_encoder.apply({"params": params["text_encoder"]}, ids, mask)
        return hidden * mask[..., None].astype(hidden.dtype), pooled, mask.astype(bool)

    def velocity(self, params: PyTree, x: jax.Array, t: jax.Array, text: tuple[jax.Array, jax.Array, jax.Array],
                 reference: jax.Array, **kwargs) -> jax.Array:  # fmt: skip
        """Predicted velocity eps - x_0.

        Args:
            params: {'dit', 'text_encoder'}.
            x: `[B, L, C]` packed noisy target latents x_t.
            t: `[B]` times in [0, 1] (1 = noise).
            text: (hidden, pooled, mask) from `encode_text`.
            reference: `[B, L, C]` packed clean source latents (Kontext reference tokens, position index 1).
            **kwargs: passed to `FlowDiT.__call__` (e.g. capture_layers).

        Returns:
            `[B, L, C]` float32.
        """
        return self._apply_dit(params, x, t, text, reference, **kwargs).astype(jnp.float32)

    def _apply_dit(self, params: PyTree, x, t, text, reference, **kwargs):
        """`FlowDiT.apply` on the editor's inputs (target and reference ids, Flux's zero text ids)."""
        hidden, pooled, mask = text
        return self.dit.apply(
            {"params": params["dit"]},
            x,
            hidden,
            pooled,
            t,
            self.image_ids(0),
            np.zeros((hidden.shape[1], 3), np.float32),  # Flux's text position ids
            ref_hidden=reference,
            ref_ids=self.image_ids(1),
            txt_mask=mask,
            **kwargs,
        )

    def token_focus_maps(self, params: PyTree, x: jax.Array, t: jax.Array, text: tuple[jax.Array, jax.Array, jax.Array],
                         reference: jax.Array) -> dict[str, jax.Array]:  # fmt: skip
        """Token-focus analysis of one velocity evaluation (arguments as `velocity`).

        Returns:
            `token_focus.collect_focus` over the DiT's focus layers: {'focus_start' [N, B], 'start_probs' [N, B, S],
            'token_importance' [N, B, Lt]}.

        Raises:
            ValueError: the DiT has no token focus.
        """
        layers = self.dit.focus_layers
        if not layers:
            raise ValueError("this flow editor has no token focus (model.token_focus_tokens = 0)")
        _, variables = self._apply_dit(params, x, t, text, reference, mutable=["intermediates"])
        return token_focus.collect_focus(variables["intermediates"], layers)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Host-side: tokenizes the instruction (its keyword span too, unused here but part of the shared batch)."""
        return editmgt.tokenize_text(self.text_tokenizer, batch, "edit")


# ---- training --------------------------------------------------------------------------------------------------


def sample_times(rng: jax.Array, batch_size: int, mode: str) -> jax.Array:
    """Training times t `[B]` in (0, 1).

    Args:
        rng: PRNG key.
        batch_size: B.
        mode: 'uniform' (on [1e-3, 1 - 1e-3]) or 'logit_normal' = sigmoid(N(0, 1)) (SD3: more weight mid-path).

    Raises:
        ValueError: an unknown mode.
    """
    if mode == "uniform":
        return jax.random.uniform(rng, (batch_size,), minval=_UNIFORM_EPS, maxval=1.0 - _UNIFORM_EPS)
    if mode == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(rng, (batch_size,)))
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {mode!r}")


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t eps for per-example times t `[B]` and states `[B, ...]` (`sampling.flow`'s path)."""
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1))  # [B, 1, ...]
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The regression target d x_t / dt = eps - x_0 `[B, ...]`."""
    return noise - x0


def drop_text(rng: jax.Array, ids: jax.Array, mask: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
    """Replaces each row of ids / mask `[B, Lt]` by the empty text (all-zero ids and mask) with probability `rate`."""
    drop = jax.random.uniform(rng, (ids.shape[0],)) < rate  # [B]
    return jnp.where(drop[:, None], 0, ids), mask & ~drop[:, None]


def empty_text(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unconditional text: all-zero ids and mask shaped like ids / mask `[B, Lt]` (what `drop_text` trains on)."""
    return jnp.zeros_like(ids), jnp.zeros_like(mask)


def make_loss(model: FlowEditor, *, cfg_dropout: float = 0.1, timestep_sampling: str = "logit_normal",
              text_gate_weight: float = 0.0, edit_weight: float = 1.0,
              train_text_encoder: bool = True):  # fmt: skip
    """The flow-matching loss `(params, model_state, batch, rng) -> (loss, LossAux)`.

    loss = mean over batch, tokens and channels of (v_theta(x_t, t, text, source) - (eps - x_0))^2, with
    x_0 = encode(target), x_t = `interpolate(x_0, eps, t)`; rng splits into (times, noise, text dropout).
    Metrics: 'loss', 'loss_low_t' / 'loss_high_t' (mean squared error of the rows with t < 0.5 / t >= 0.5; 0 when
    a batch has none). Target and source are encoded in one autoencoder call (GroupNorm is per image).

    Args:
        model: the editor's modules.
        cfg_dropout: probability of replacing a row's instruction by the empty text (`drop_text`).
        timestep_sampling: 'uniform' or 'logit_normal' (`sample_times`).
        text_gate_weight: > 0 adds, times this weight, the binary cross-entropy of every text cross-attention
          block's gate (target and reference tokens) against the cells of the batch's pixel `edit_mask` (the
          world's; `editmgt.cells_with_any`), over the rows that kept their text (`editmgt.text_gate_bce`). Metrics
          'text_gate_loss' and 'text_gate_accuracy' (last block). Needs `model.text_cross_attention`. Not in Flux.
        edit_weight: the squared error of target tokens whose cell holds an edited pixel (`editmgt.cells_with_any`
          of the batch's `edit_mask`) weighs this much, the others 1; the loss is then the weighted mean over batch
          and tokens (EditMGT's `loss.edit_weight` for the flow editor; 1 = plain flow matching). Not in Flux.
        train_text_encoder: False stops the gradient at the text encoder's outputs (config `text.train_encoder`).

    Raises:
        ValueError: an unknown timestep_sampling, text_gate_weight > 0 without text cross-attention, or
          edit_weight <= 0.
    """
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    if edit_weight <= 0:
        raise ValueError(f"loss.edit_weight must be > 0, got {edit_weight}")
    if text_gate_weight > 0 and not model.dit.text_cross_attention:
        raise ValueError("loss.text_gate_weight > 0 needs model.text_cross_attention")
    gates = tuple(f"text_cross_blocks_{i}" for i in range(model.dit.num_layers)) if text_gate_weight > 0 else ()

    def loss(params, model_state, batch, rng):
        time_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        both = model.encode(model_state, jnp.concatenate([batch["target_image"], batch["source_image"]]))  # [2B, L, C]
        x0, reference = jnp.split(both, 2)  # [B, L, C] each: target latents, source (reference) latents
        t = sample_times(time_rng, x0.shape[0], timestep_sampling)  # [B]
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)  # [B, L, C]
        x_t = interpolate(x0, noise, t)  # [B, L, C]
        ids, mask = drop_text(drop_rng, batch["text_ids"], batch["text_mask"], cfg_dropout)
        text = model.encode_text(params, ids, mask)
        if not train_text_encoder:
            text = jax.lax.stop_gradient(text)
        if gates:
            predicted, variables = model._apply_dit(params, x_t, t, text, reference, mutable=["intermediates"])
            predicted = predicted.astype(jnp.float32)  # [B, L, C]
        else:
            predicted = model.velocity(params, x_t, t, text, reference)  # [B, L, C]
        per_token = jnp.mean(jnp.square(predicted - velocity_target(x0, noise)), axis=2)  # [B, L]
        per_example = jnp.mean(per_token, axis=1)  # [B]
        total = jnp.mean(per_example)
        edited = _edited_cells(batch, model.token_grid) if gates or edit_weight != 1.0 else None  # [B, g]
        if edit_weight != 1.0:
            weights = 1.0 + (edit_weight - 1.0) * edited  # [B, L]
            total = jnp.sum(per_token * weights) / jnp.sum(weights)
        low = (t < 0.5).astype(jnp.float32)  # [B]
        metrics = {
            "loss": total,
            "loss_low_t": jnp.sum(per_example * low) / jnp.maximum(jnp.sum(low), 1.0),
            "loss_high_t": jnp.sum(per_example * (1 - low)) / jnp.maximum(jnp.sum(1 - low), 1.0),
        }
        if gates:
            # [B, 2g]: reference tokens share the target's cells; with text_cross_source only the reference tokens'
            # gates are sown ([B, g]; a target token's gate is a copy of its reference token's).
            cells = edited if model.dit.text_cross_source else jnp.concatenate([edited, edited], axis=1)
            rows = jnp.any(mask, axis=1).astype(jnp.float32)  # [B]: rows whose text was dropped read nothing
            # (loss, agreement) per block
            per_block = [editmgt.text_gate_bce(variables["intermediates"][name]["text_gate"][0], cells, rows)
                         for name in gates]  # fmt: skip
            metrics["text_gate_loss"] = sum(loss for loss, _ in per_block) / len(gates)
            metrics["text_gate_accuracy"] = per_block[-1][1]
            total = total + text_gate_weight * metrics["text_gate_loss"]
            metrics["loss"] = total
        return total, LossAux(metrics=metrics, model_state=model_state)

    return loss


def _edited_cells(batch: Batch, grid: int) -> jax.Array:
    """`[B, grid * grid]` 0/1: the target token cells that hold an edited pixel of the batch's world `edit_mask`."""
    if "edit_mask" not in batch:
        raise ValueError("loss.text_gate_weight > 0 and loss.edit_weight != 1 need batches with an 'edit_mask'")
    return editmgt.cells_with_any(batch["edit_mask"], grid)


def latent_stats(model: FlowEditor, tokenizer_variables: PyTree, images_uint8: jax.Array) -> dict[str, jax.Array]:
    """Latent normalization {'shift': [], 'scale': []} float32 (see the module docstring).

    Args:
        model: the editor (its autoencoder's `scaling_factor` / `shift_factor` win when not the defaults 1 / 0).
        tokenizer_variables: frozen autoencoder variables.
        images_uint8: `[N, S, S, 3]` images whose posterior means give the mean and 1 / std otherwise.
    """
    autoencoder = model.autoencoder
    if autoencoder.scaling_factor != 1.0 or autoencoder.shift_factor != 0.0:
        return {"shift": jnp.float32(autoencoder.shift_factor), "scale": jnp.float32(autoencoder.scaling_factor)}
    means = model.raw_latents({"tokenizer": tokenizer_variables}, images_uint8)  # [N, h, h, C]
    return {"shift": jnp.mean(means), "scale": 1.0 / jnp.maximum(jnp.std(means), 1e-6)}


# ---- editing ---------------------------------------------------------------------------------------------------


def make_edit_fn(model: FlowEditor, settings: FlowSettings):
    """The jitted edit, signature-compatible with `editmgt.make_edit_fn` so `editmgt.run_edits` drives it.

    `edit(params, model_state, source, text_ids, text_mask, text_positions, rng, lam, gamma) -> dict`:
    encodes the source uint8 `[B, S, S, 3]` to reference latents, draws x_1 ~ N(0, I) from the first half of
    `jax.random.split(rng)`, runs `sampling.flow.sample` with the ODE on every step of `flow.timesteps(num_steps,
    shift)` (the second half of the split is its unused SDE key) and decodes x_0. With start_time t_s < 1 it starts
    from (1 - t_s) reference + t_s x_1 on the schedule scaled by t_s. With guidance_scale w != 0 each step evaluates
    the conditional and the empty-text velocity in one batch of 2B and uses v_u + w (v_c - v_u).
    text_positions, lam and gamma are EditMGT's arguments and are ignored.

    Returns:
        {'images': uint8 `[B, S, S, 3]`, 'latents': x_0 `[B, L, C]` float32 (normalized, packed)}.
    """
    schedule = settings.start_time * flow.timesteps(settings.num_steps, settings.shift)  # [S + 1]
    use_cfg = settings.guidance_scale != 0.0
    ode_only = jnp.zeros((settings.num_steps,), bool)  # [S]

    def edit(params, model_state, source, text_ids, text_mask, text_positions, rng, lam, gamma):
        del text_positions, lam, gamma
        reference = model.encode(model_state, source)  # [B, L, C]
        batch = reference.shape[0]
        text = model.encode_text(params, text_ids, text_mask)
        if use_cfg:
            unconditional = model.encode_text(params, *empty_text(text_ids, text_mask))
            text = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), text, unconditional)  # [2B, ...]
            reference = jnp.concatenate([reference, reference])  # [2B, L, C]

        def velocity_fn(x, t):
            x_in = jnp.concatenate([x, x]) if use_cfg else x  # [B or 2B, L, C]
            v = model.velocity(params, x_in, jnp.full((x_in.shape[0],), t), text, reference)
            if use_cfg:
                conditional, unconditional = v[:batch], v[batch:]
                v = unconditional + settings.guidance_scale * (conditional - unconditional)
            return v  # [B, L, C]

        noise_rng, sde_rng = jax.random.split(rng)
        x_1 = jax.random.normal(noise_rng, (batch, *reference.shape[1:]), jnp.float32)  # [B, L, C]
        if settings.start_time < 1.0:
            x_1 = (1.0 - settings.start_time) * reference[:batch] + settings.start_time * x_1  # x at t = start_time
        x_0, _, _ = flow.sample(velocity_fn, x_1, timesteps=schedule, rng=sde_rng, noise_level=0.0,
                                sde_steps_mask=ode_only)  # fmt: skip
        return {"images": model.decode(model_state, x_0), "latents": x_0}

    return jax.jit(edit)


def evaluate_batches(edit_fn, params, model_state, batches: Iterable[Batch], settings: FlowSettings, *,
                     seed: int = 0, progress=None) -> dict[str, Any]:  # fmt: skip
    """Edits prepared host batches and scores them with the synthetic-world verifier (`editmgt.score_edits`).

    Batch i uses seed `seed + i`.

    Returns:
        {'num_examples', 'verifier_success', 'preservation_l1' (mean L1 to the source outside the edit mask),
        'per_example_success', 'per_example_edit_type' (lists in batch order),
        'per_edit_type': {type: {'verifier_success', 'preservation_l1', 'num_examples'}}}.
    """
    results = editmgt.evaluate_batches(edit_fn, params, model_state, batches, settings, thresholds={"plain": 0.0},
                                       seed=seed, progress=progress)  # fmt: skip
    return {k: v for k, v in results["plain"].items() if k != "region_hold_threshold"}


# ---- the objective ---------------------------------------------------------------------------------------------


def visualize_edits(edit_fn, params, model_state, batch: Batch, settings: FlowSettings):
    """Rows [source, target, output] (float [0, 1] HWC) for up to 8 examples, and the column labels."""
    batch = {k: v[:MAX_VISUALIZED_ROWS] for k, v in batch.items()}
    outputs = editmgt.run_edits(edit_fn, params, model_state, batch, settings)
    rows = [
        [np.asarray(batch[key][i], np.float32) / 255.0 for key in ("source_image", "target_image")]
        + [outputs["images"][i].astype(np.float32) / 255.0]
        for i in range(len(outputs["images"]))
    ]
    return rows, ["source", "target", "output"]


def make_objective(model: FlowEditor, frozen_tokenizer: PyTree, *, cfg_dropout: float, timestep_sampling: str,
                   settings: FlowSettings, init_params: PyTree | None = None,
                   init_latent_stats: PyTree | None = None, text_gate_weight: float = 0.0,
                   edit_weight: float = 1.0, train_text_encoder: bool = True) -> Objective:  # fmt: skip
    """The trainer objective.

    Args:
        model: the editor's modules.
        frozen_tokenizer: the KL autoencoder variables ({'params': ...}); they ride in the model state.
        cfg_dropout: probability of training on the empty text.
        timestep_sampling: 'uniform' or 'logit_normal'.
        settings: sampler settings of visualize / evaluate.
        init_params: optional params replacing the fresh ones where paths and shapes match (a previous run's).
        init_latent_stats: optional latent statistics to keep (the `init_params` run's) instead of estimating them.
        text_gate_weight, edit_weight, train_text_encoder: see `make_loss`.

    Returns:
        An Objective whose evaluate reports 'verifier_success', 'preservation_l1' and 'verifier_success/<type>'.
    """
    edit_fn = make_edit_fn(model, settings)

    def init(rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        dit_rng, text_rng = jax.random.split(rng)
        batch_size = batch["text_ids"].shape[0]
        (hidden, pooled), text_variables = model.text_encoder.init_with_output(
            text_rng, batch["text_ids"], batch["text_mask"]
        )
        tokens = jnp.zeros((batch_size, model.token_grid**2, model.token_channels), jnp.float32)  # [B, L, C]
        dit_params = model.dit.init(
            dit_rng, tokens, hidden, pooled, jnp.ones((batch_size,), jnp.float32), model.image_ids(0),
            np.zeros((hidden.shape[1], 3), np.float32), ref_hidden=tokens, ref_ids=model.image_ids(1),
        )["params"]  # fmt: skip
        params = {"dit": dit_params, "text_encoder": text_variables["params"]}
        if init_params is not None:
            params = editmgt.replace_params(params, init_params)
        if init_latent_stats is not None:
            stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(init_latent_stats))
        else:
            images = jnp.concatenate([jnp.asarray(batch["source_image"]), jnp.asarray(batch["target_image"])])
            stats = latent_stats(model, frozen_tokenizer, images)
        return {"params": params, "tokenizer": frozen_tokenizer, "latent_stats": stats}

    def visualize(params, model_state, batch):
        return visualize_edits(edit_fn, params, model_state, batch, settings)

    def evaluate(params, model_state, batches):
        result = evaluate_batches(edit_fn, params, model_state, batches, settings)
        metrics = {"verifier_success": result["verifier_success"], "preservation_l1": result["preservation_l1"]}
        for edit_type, values in result["per_edit_type"].items():
            metrics[f"verifier_success/{edit_type}"] = values["verifier_success"]
        return metrics

    return Objective(
        name="flow_edit",
        init=init,
        loss=make_loss(
            model,
            cfg_dropout=cfg_dropout,
            timestep_sampling=timestep_sampling,
            text_gate_weight=text_gate_weight,
            edit_weight=edit_weight,
            train_text_encoder=train_text_encoder,
        ),
        visualize=visualize,
        evaluate=evaluate,
        prepare_batch=model.prepare_batch,
    )


# ---- building from a config ------------------------------------------------------------------------------------


def build_model(config) -> FlowEditor:
    """Modules from a (resolved) config: `tokenizer.model_json` and `text.vocab` must be filled.

    Raises:
        ValueError: an unresolved config, or an image size the autoencoder and patch size do not divide.
    """
    from editing_jax.methods import module_kwargs

    if not config.tokenizer.model_json:
        raise ValueError("config.tokenizer.model_json is empty; build the objective first (it resolves it)")
    autoencoder = AutoencoderKL(**module_kwargs(json.loads(config.tokenizer.model_json)))
    if config.text.get("gate_encoder", False):
        raise ValueError("text.gate_encoder is an EditMGT option; the flow editor does not have it")
    tokenizer, text_encoder = editmgt.build_text_modules(config.text)
    dit = FlowDiT(**module_kwargs(config.model))
    size, patch = int(config.data.size), int(config.patch_size)
    if size % (autoencoder.downsample_factor * patch):
        raise ValueError(f"image size {size} is not divisible by the latent downsampling x patch size "
                         f"{autoencoder.downsample_factor} x {patch}")  # fmt: skip
    return FlowEditor(dit, text_encoder, autoencoder, tokenizer, size, patch)


def resolve_config(config) -> None:
    """Fills `tokenizer.model_json` (from the KL autoencoder run) and `text.vocab` (from the world) when empty.

    Raises:
        ValueError: no `tokenizer.checkpoint`, a tokenizer run that is not 'tokenizer_kl', or another image size.
    """
    editmgt.resolve_tokenizer_and_vocab(config, expected_method="tokenizer_kl")


def build_objective(config) -> Objective:
    """The objective of a `configs/cogniedit/sft.py` config (resolves it first; `init_from` must be a flow_edit run)."""
    from editing_jax.train import checkpoint

    resolve_config(config)
    model = build_model(config)
    tokenizer_run = checkpoint.load_trained(config.tokenizer.checkpoint)
    frozen = {"params": tokenizer_run.inference_params, **tokenizer_run.model_state}
    init_params = init_stats = None
    if config.init_from:
        previous = checkpoint.load_trained(config.init_from)
        if previous.config.get("method") != "flow_edit":
            raise ValueError(
                f"init_from {config.init_from} is a {previous.config.get('method')} run, expected flow_edit"
            )
        init_params, init_stats = previous.inference_params, previous.model_state.get("latent_stats")
    return make_objective(
        model,
        frozen,
        cfg_dropout=float(config.loss.cfg_dropout),
        timestep_sampling=str(config.loss.timestep_sampling),
        settings=FlowSettings.from_config(config.sampling),
        init_params=init_params,
        init_latent_stats=init_stats,
        text_gate_weight=float(config.loss.get("text_gate_weight", 0.0)),
        edit_weight=float(config.loss.get("edit_weight", 1.0)),
        train_text_encoder=bool(config.text.get("train_encoder", True)),
    )
