"""The flow editor (CogniEdit's base policy): a Flux/Kontext-style rectified-flow DiT on frozen KL latents.

Supervised fine-tuning (`configs/cogniedit/sft.py`): target latents x_0, noise eps, x_t = (1 - t) x_0 + t eps and the
DiT, given x_t, the instruction and the *clean* source latents as Kontext reference tokens (concatenated along the
sequence, position index 1), regresses the velocity v = eps - x_0 (the convention of `sampling.flow`). Times are
drawn uniformly or logit-normally (SD3); the instruction is dropped with probability `loss.cfg_dropout` so the model
also learns the unconditional velocity used by classifier-free guidance.

Latents are normalized by statistics of the first training batch, (z - shift) * scale with the mean and 1 / std of
the posterior means of its source and target images; they ride in the model state (`latent_stats`) next to the
frozen autoencoder (`tokenizer`), so a checkpoint is self-contained.

Editing is one compiled function with the same signature as EditMGT's (`editmgt.run_edits` and
`editmgt.evaluate_batches` drive both): encode the source, integrate the ODE from noise with `sampling.flow.sample`
(an SDE window is GRPO's business), decode.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.methods import editmgt
from editing_jax.methods.tokenizer import float_to_uint8, images_to_float
from editing_jax.models.autoencoder import AutoencoderKL
from editing_jax.models.flow_dit import FlowDiT, latent_image_ids, pack_latents, unpack_latents
from editing_jax.sampling import flow
from editing_jax.text.encoder import TextEncoder
from editing_jax.text.tokenizer import WordTokenizer
from editing_jax.train.objective import Batch, LossAux, Objective

PyTree = Any
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
MAX_VISUALIZED_ROWS = 8


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """Inference settings of the flow editor (num_steps is static: it changes the compiled graph)."""

    num_steps: int = 20
    guidance_scale: float = 0.0
    shift: float = 1.0
    # EditMGT's attention/region-hold settings, read by the shared `editmgt.run_edits`; unused by the flow editor.
    region_hold_threshold: float = 0.0
    gamma: float = 1.0
    text_positions: str = "all"

    @classmethod
    def from_config(cls, config, **overrides) -> FlowSettings:
        values = {field.name: config.get(field.name, field.default) for field in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if int(values["num_steps"]) < 1:
            raise ValueError("num_steps must be >= 1")
        return cls(int(values["num_steps"]), float(values["guidance_scale"]), float(values["shift"]))


@dataclasses.dataclass(frozen=True)
class FlowEditor:
    """The modules of a flow editor (stateless; parameters are passed in).

    params = {'dit': ..., 'text_encoder': ...}; model_state = {'tokenizer': KL variables, 'latent_stats': {'shift',
    'scale'}}.
    """

    dit: FlowDiT
    text_encoder: TextEncoder
    autoencoder: AutoencoderKL
    text_tokenizer: WordTokenizer
    image_size: int
    patch_size: int = 2

    @property
    def latent_grid(self) -> int:
        return self.image_size // self.autoencoder.downsample_factor

    @property
    def token_grid(self) -> int:
        return self.latent_grid // self.patch_size

    def image_ids(self, index: int) -> np.ndarray:
        """`[L, 3]` RoPE position ids of the target (index 0) or reference (index 1) tokens."""
        return latent_image_ids(self.token_grid, self.token_grid, index)

    def raw_latents(self, model_state: PyTree, images_uint8: jax.Array) -> jax.Array:
        """uint8 `[B, H, W, 3]` -> posterior means `[B, h, w, C]` (frozen autoencoder, unnormalized)."""
        variables = jax.lax.stop_gradient(model_state["tokenizer"])
        mean, _ = self.autoencoder.apply(variables, images_to_float(images_uint8), method=AutoencoderKL.encode)
        return mean

    def encode(self, model_state: PyTree, images_uint8: jax.Array) -> jax.Array:
        """uint8 images -> normalized packed latents `[B, L, C * p * p]`."""
        stats = model_state["latent_stats"]
        latents = (self.raw_latents(model_state, images_uint8) - stats["shift"]) * stats["scale"]
        return pack_latents(latents, self.patch_size)

    def decode(self, model_state: PyTree, packed: jax.Array) -> jax.Array:
        """Normalized packed latents `[B, L, C * p * p]` -> uint8 images `[B, H, W, 3]`."""
        stats = model_state["latent_stats"]
        latents = unpack_latents(packed, self.latent_grid, self.latent_grid, self.patch_size)
        latents = latents / stats["scale"] + stats["shift"]
        images = self.autoencoder.apply(model_state["tokenizer"], latents, method=AutoencoderKL.decode)
        return float_to_uint8(images)

    def encode_text(self, params: PyTree, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(hidden `[B, Lt, D]` with padded positions zeroed, pooled `[B, P]`); the DiT has no text mask."""
        hidden, pooled = self.text_encoder.apply({"params": params["text_encoder"]}, ids, mask)
        return hidden * mask[..., None].astype(hidden.dtype), pooled

    def velocity(self, params: PyTree, x: jax.Array, t: jax.Array, text: tuple[jax.Array, jax.Array],
                 reference: jax.Array, **kwargs) -> jax.Array:  # fmt: skip
        """Velocity `[B, L, C]` of packed latents x `[B, L, C]` at times t `[B]`, given (hidden, pooled) text from
        `encode_text` and the packed reference latents `[B, L, C]`."""
        hidden, pooled = text
        return self.dit.apply(
            {"params": params["dit"]},
            x,
            hidden,
            pooled,
            t,
            self.image_ids(0),
            np.zeros((hidden.shape[1], 3), np.float32),
            ref_hidden=reference,
            ref_ids=self.image_ids(1),
            **kwargs,
        ).astype(jnp.float32)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Host-side: tokenizes the instruction (and the keyword span, unused here but kept for a shared eval)."""
        return editmgt.tokenize_text(self.text_tokenizer, batch, "edit")


def sample_times(rng: jax.Array, batch_size: int, mode: str) -> jax.Array:
    """Training times t `[B]` in (0, 1): 'uniform', or 'logit_normal' = sigmoid(N(0, 1)) (SD3)."""
    if mode == "uniform":
        return jax.random.uniform(rng, (batch_size,), minval=1e-3, maxval=1.0 - 1e-3)
    if mode == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(rng, (batch_size,)))
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {mode!r}")


def _drop_text(rng: jax.Array, batch: Batch, cfg_dropout: float) -> tuple[jax.Array, jax.Array]:
    drop = jax.random.uniform(rng, (batch["text_ids"].shape[0],)) < cfg_dropout  # [B]
    return jnp.where(drop[:, None], 0, batch["text_ids"]), batch["text_mask"] & ~drop[:, None]


def make_loss(model: FlowEditor, *, cfg_dropout: float = 0.1, timestep_sampling: str = "logit_normal"):
    """The flow-matching loss `(params, model_state, batch, rng) -> (loss, LossAux)`: mean ||v_pred - (eps - x_0)||^2."""
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")

    def loss(params, model_state, batch, rng):
        time_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        x0 = model.encode(model_state, batch["target_image"])  # [B, L, C]
        reference = model.encode(model_state, batch["source_image"])  # [B, L, C]
        t = sample_times(time_rng, x0.shape[0], timestep_sampling)  # [B]
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
        ids, mask = _drop_text(drop_rng, batch, cfg_dropout)
        predicted = model.velocity(params, x_t, t, model.encode_text(params, ids, mask), reference)
        total = jnp.mean(jnp.square(predicted - (noise - x0)))
        return total, LossAux(metrics={"loss": total}, model_state=model_state)

    return loss


def make_edit_fn(model: FlowEditor, settings: FlowSettings):
    """The jitted edit, signature-compatible with `editmgt.make_edit_fn` so `editmgt.run_edits` drives it.

    `(params, model_state, source uint8 [B, S, S, 3], text_ids, text_mask, text_positions, rng, lam, gamma) -> dict`
    with 'images' uint8 [B, S, S, 3] and 'latents' [B, L, C]; text_positions, lam and gamma are ignored (EditMGT's
    attention/region-hold arguments).
    """
    schedule = flow.timesteps(settings.num_steps, settings.shift)  # [S + 1]

    def edit(params, model_state, source, text_ids, text_mask, text_positions, rng, lam, gamma):
        del text_positions, lam, gamma
        reference = model.encode(model_state, source)  # [B, L, C]
        batch = reference.shape[0]
        text = model.encode_text(params, text_ids, text_mask)
        use_cfg = settings.guidance_scale != 0.0
        if use_cfg:
            empty = model.encode_text(params, jnp.zeros_like(text_ids), jnp.zeros_like(text_mask))
            text = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), text, empty)
            reference = jnp.concatenate([reference, reference])

        def velocity_fn(x, t):
            x_in = jnp.concatenate([x, x]) if use_cfg else x
            v = model.velocity(params, x_in, jnp.full((x_in.shape[0],), t), text, reference)
            if use_cfg:
                cond, uncond = v[:batch], v[batch:]
                v = uncond + settings.guidance_scale * (cond - uncond)
            return v

        noise_rng, sde_rng = jax.random.split(rng)
        x_T = jax.random.normal(noise_rng, reference[:batch].shape, jnp.float32)
        x_0, _, _ = flow.sample(velocity_fn, x_T, timesteps=schedule, rng=sde_rng, noise_level=0.0,
                                sde_steps_mask=jnp.zeros((settings.num_steps,), bool))  # fmt: skip
        return {"images": model.decode(model_state, x_0), "latents": x_0}

    return jax.jit(edit)


def _latent_stats(model: FlowEditor, tokenizer_variables: PyTree, batch: Batch) -> dict[str, jax.Array]:
    images = jnp.concatenate([jnp.asarray(batch["source_image"]), jnp.asarray(batch["target_image"])])
    means = model.raw_latents({"tokenizer": tokenizer_variables}, images)  # [2B, h, w, C]
    return {"shift": jnp.mean(means), "scale": 1.0 / jnp.maximum(jnp.std(means), 1e-6)}


def make_objective(model: FlowEditor, frozen_tokenizer: PyTree, *, cfg_dropout: float, timestep_sampling: str,
                   settings: FlowSettings, init_params: PyTree | None = None) -> Objective:  # fmt: skip
    """The trainer objective; `init_params` optionally replace the fresh params (e.g. a previous run's)."""
    edit_fn = make_edit_fn(model, settings)

    def init(rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        dit_rng, text_rng = jax.random.split(rng)
        batch_size = batch["text_ids"].shape[0]
        (hidden, pooled), text_variables = model.text_encoder.init_with_output(
            text_rng, batch["text_ids"], batch["text_mask"]
        )
        channels = model.autoencoder.latent_channels * model.patch_size**2
        tokens = jnp.zeros((batch_size, model.token_grid**2, channels), jnp.float32)  # [B, L, C]
        dit_params = model.dit.init(
            dit_rng, tokens, hidden, pooled, jnp.ones((batch_size,), jnp.float32), model.image_ids(0),
            np.zeros((hidden.shape[1], 3), np.float32), ref_hidden=tokens, ref_ids=model.image_ids(1),
        )["params"]  # fmt: skip
        params = {"dit": dit_params, "text_encoder": text_variables["params"]}
        if init_params is not None:
            params = editmgt.replace_params(params, init_params)
        stats = _latent_stats(model, frozen_tokenizer, batch)
        return {"params": params, "tokenizer": frozen_tokenizer, "latent_stats": stats}

    def visualize(params, model_state, batch):
        batch = {k: v[:MAX_VISUALIZED_ROWS] for k, v in batch.items()}
        outputs = editmgt.run_edits(edit_fn, params, model_state, batch, settings)
        rows = [
            [np.asarray(batch[key][i], np.float32) / 255.0 for key in ("source_image", "target_image")]
            + [outputs["images"][i].astype(np.float32) / 255.0]
            for i in range(len(outputs["images"]))
        ]
        return rows, ["source", "target", "output"]

    def evaluate(params, model_state, batches):
        result = editmgt.evaluate_batches(edit_fn, params, model_state, batches, settings, thresholds={"plain": 0.0})
        return {"verifier_success": result["plain"]["verifier_success"],
                "preservation_l1": result["plain"]["preservation_l1"]}  # fmt: skip

    return Objective(
        name="flow_edit",
        init=init,
        loss=make_loss(model, cfg_dropout=cfg_dropout, timestep_sampling=timestep_sampling),
        visualize=visualize,
        evaluate=evaluate,
        prepare_batch=model.prepare_batch,
    )


# ---- building from a config ------------------------------------------------------------------------------------


def build_model(config) -> FlowEditor:
    """Modules from a (resolved) config: `tokenizer.model_json` and `text.vocab` must be filled."""
    from editing_jax.methods import module_kwargs

    if not config.tokenizer.model_json:
        raise ValueError("config.tokenizer.model_json is empty; build the objective first (it resolves it)")
    autoencoder = AutoencoderKL(**module_kwargs(json.loads(config.tokenizer.model_json)))
    tokenizer = WordTokenizer(
        tuple(config.text.vocab.split()),
        max_length=int(config.text.max_length),
        num_hash_buckets=int(config.text.num_hash_buckets),
    )
    text_encoder = TextEncoder(
        vocab_size=tokenizer.vocab_size,
        width=int(config.text.width),
        num_layers=int(config.text.num_layers),
        num_heads=int(config.text.num_heads),
        max_length=int(config.text.max_length),
        pooled_dim=int(config.text.pooled_dim),
    )
    dit = FlowDiT(**module_kwargs(config.model))
    size, patch = int(config.data.size), int(config.patch_size)
    if size % (autoencoder.downsample_factor * patch):
        raise ValueError(f"image size {size} is not divisible by the latent downsampling x patch size "
                         f"{autoencoder.downsample_factor} x {patch}")  # fmt: skip
    return FlowEditor(dit, text_encoder, autoencoder, tokenizer, size, patch)


def resolve_config(config) -> None:
    """Fills `tokenizer.model_json` (from the KL autoencoder run) and `text.vocab` (from the world) when empty."""
    editmgt.resolve_tokenizer_and_vocab(config, expected_method="tokenizer_kl")


def build_objective(config) -> Objective:
    from editing_jax.train import checkpoint

    resolve_config(config)
    model = build_model(config)
    tokenizer_run = checkpoint.load_trained(config.tokenizer.checkpoint)
    frozen = {"params": tokenizer_run.inference_params, **tokenizer_run.model_state}
    init_params = checkpoint.load_trained(config.init_from).inference_params if config.init_from else None
    return make_objective(
        model,
        frozen,
        cfg_dropout=float(config.loss.cfg_dropout),
        timestep_sampling=str(config.loss.timestep_sampling),
        settings=FlowSettings.from_config(config.sampling),
        init_params=init_params,
    )
