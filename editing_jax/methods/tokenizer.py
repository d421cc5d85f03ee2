"""Training objectives for the image tokenizers: the VQ tokenizer (EditMGT) and the KL autoencoder (flow DiT).

Both reconstruct the source and target images of an editing batch (concatenated along the batch), so the
tokenizer sees exactly the image distribution the editors will generate. Batches are dicts with uint8
'source_image' and 'target_image' [B, S, S, 3]; evaluation batches may add 'target_scene' (scene JSON strings), in
which case the synthetic-world verifier scores the reconstructed targets: a tokenizer whose reconstructions the
verifier cannot parse would cap every editor built on it.

rng streams used by the losses (both derived from the trainer's per-step rng): 'restart' (VQ dead-code restart)
and 'sample' (KL posterior sampling). Neither model uses dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from editing_jax.models.autoencoder import AutoencoderKL, gaussian_kl
from editing_jax.models.vq import VQModel, kmeans_plus_plus
from editing_jax.train.objective import LossAux, Objective

PyTree = Any
Batch = Mapping[str, Any]

RECON_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "l1": lambda recon, target: jnp.mean(jnp.abs(recon - target)),
    "l2": lambda recon, target: jnp.mean(jnp.square(recon - target)),
    # L2 pulls small objects out of the background early (L1's median solution ignores them); L1 sharpens edges.
    "l1+l2": lambda recon, target: jnp.mean(jnp.abs(recon - target)) + jnp.mean(jnp.square(recon - target)),
}
MAX_VISUALIZED_ROWS = 8


def images_to_float(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def float_to_uint8(images: jax.Array) -> jax.Array:
    """float in [-1, 1] (clipped) -> uint8 in [0, 255], rounding to nearest."""
    images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
    return jnp.round((images + 1.0) * 127.5).astype(jnp.uint8)


def psnr(recon: jax.Array, target: jax.Array) -> jax.Array:
    """Per-image PSNR (dB) for images [B, H, W, C] in [-1, 1] (recon clipped), peak = the full range -> [B]."""
    recon = jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)
    mse = jnp.mean(jnp.square((recon - target) / 2.0), axis=tuple(range(1, target.ndim)))  # in [0, 1] units
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _training_images(batch: Batch) -> jax.Array:
    """Source and target images concatenated along the batch, float32 [2B, S, S, 3] in [-1, 1]."""
    return jnp.concatenate([images_to_float(batch["source_image"]), images_to_float(batch["target_image"])], axis=0)


def _recon_loss_fn(recon_loss: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"unknown recon_loss {recon_loss!r}; valid: {sorted(RECON_LOSSES)}")
    return RECON_LOSSES[recon_loss]


def _visualize(forward: Callable, params: PyTree, model_state: PyTree, batch: Batch):
    """Rows [original, reconstruction] for up to 8 images (sources first, then targets), float [0, 1] HWC.

    Reuses the evaluation forward pass (`forward(params, model_state, uint8 images) -> (recon uint8, ...)`), so a
    training run compiles one inference graph for both.
    """
    originals = np.concatenate([np.asarray(batch["source_image"]), np.asarray(batch["target_image"])], axis=0)
    originals = originals[:MAX_VISUALIZED_ROWS]  # [R, S, S, 3] uint8
    recons = np.asarray(forward(params, model_state, originals)[0])  # [R, S, S, 3] uint8
    rows = [
        [o.astype(np.float32) / 255.0, r.astype(np.float32) / 255.0] for o, r in zip(originals, recons, strict=True)
    ]
    return rows, ["original", "reconstruction"]


def _verifier_success(recon_targets: list[np.ndarray], target_scenes: list[str]) -> float:
    from editing_jax.data.world import verifier

    return float(verifier.verify(recon_targets, target_scenes).success.mean())


def _evaluate(forward: Callable, params: PyTree, model_state: PyTree, batches: Iterable[Batch]):
    """Runs `forward(params, model_state, uint8 images) -> (recon uint8, psnr [N], extras)` over both image sets.

    Returns (mean psnr, verifier success or None, list of per-batch extras).
    """
    psnrs, extras, recon_targets, target_scenes = [], [], [], []
    for batch in batches:
        num_targets = len(batch["target_image"])
        images = np.concatenate([np.asarray(batch["source_image"]), np.asarray(batch["target_image"])], axis=0)
        recon, image_psnr, extra = forward(params, model_state, images)
        psnrs.append(np.asarray(image_psnr))
        extras.append(jax.device_get(extra))
        if "target_scene" in batch:
            recon_targets.extend(np.asarray(recon)[-num_targets:])
            target_scenes.extend(str(scene) for scene in batch["target_scene"])
    if not psnrs:
        raise ValueError("evaluate needs at least one batch")
    success = _verifier_success(recon_targets, target_scenes) if target_scenes else None
    return float(np.concatenate(psnrs).mean()), success, extras


def _seed_codebook(model: VQModel, variables: PyTree, images: jax.Array, rng: jax.Array) -> PyTree:
    """Replaces the codebook in init `variables` by k-means++ seeds drawn from the images' pre-quantization vectors.

    Keeps the logical-partitioning boxes of the init variables (the trainer derives shardings from them).
    """
    vectors = model.apply(variables, images, method=VQModel.encode_continuous)  # [N, h, w, D]
    vectors = model.apply(variables, vectors, method=lambda vq, z: vq.quantize.prepare(z))
    codes = kmeans_plus_plus(rng, vectors, model.codebook_size)  # [K, D]
    state = dict(variables["state"])
    quantize = dict(state["quantize"])
    quantize["codebook"] = quantize["codebook"].replace_boxed(codes)
    state["quantize"] = quantize
    return {**variables, "state": state}


def make_vq_objective(model: VQModel, *, recon_loss: str = "l1") -> Objective:
    """Objective training `model` to reconstruct source and target images through its codebook.

    loss = recon_loss + commitment_loss (already weighted by `model.commitment_weight`); the codebook state is
    updated by EMA inside the loss (returned as the new model state). Needs the 'restart' rng (from the loss rng).

    Metrics: 'loss', 'recon_loss', 'commitment_loss', 'psnr', 'codebook_usage' (fraction of codes used in the
    batch), 'perplexity', 'restarted_codes'. Evaluation: 'psnr', 'codebook_usage' and 'perplexity' over the whole
    eval set, and 'verifier_success' on reconstructed targets when batches carry 'target_scene'.
    """
    recon_loss_fn = _recon_loss_fn(recon_loss)

    def init(rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        init_rng, seed_rng = jax.random.split(rng)
        variables = model.init(init_rng, images_to_float(batch["source_image"]), train=False)
        if model.codebook_init == "kmeans++":
            variables = _seed_codebook(model, variables, _training_images(batch), seed_rng)
        return variables

    def loss(params, model_state, batch, rng):
        images = _training_images(batch)  # [2B, S, S, 3]
        (recon, aux), new_state = model.apply(
            {"params": params, **model_state}, images, train=True, mutable=["state"], rngs={"restart": rng}
        )
        recon = recon.astype(jnp.float32)
        reconstruction = recon_loss_fn(recon, images)
        total = reconstruction + aux["commitment_loss"]
        metrics = {
            "loss": total,
            "recon_loss": reconstruction,
            "commitment_loss": aux["commitment_loss"],
            "psnr": jnp.mean(psnr(recon, images)),
            "codebook_usage": aux["codebook_usage"],
            "perplexity": aux["perplexity"],
            "restarted_codes": aux["restarted_codes"].astype(jnp.float32),
        }
        return total, LossAux(metrics=metrics, model_state={**model_state, **new_state})

    @jax.jit  # Built once per objective: compiled once per eval batch shape, reused by visualize.
    def eval_forward(params, model_state, images_uint8):
        images = images_to_float(images_uint8)
        recon, aux = model.apply({"params": params, **model_state}, images, train=False)
        code_counts = jnp.zeros((model.codebook_size,), jnp.int32).at[aux["indices"].reshape(-1)].add(1)  # [K]
        return float_to_uint8(recon), psnr(recon, images), code_counts

    def visualize(params, model_state, batch):
        return _visualize(eval_forward, params, model_state, batch)

    def evaluate(params, model_state, batches):
        mean_psnr, success, code_counts = _evaluate(eval_forward, params, model_state, batches)
        counts = np.sum(np.stack(code_counts), axis=0).astype(np.float64)  # [K]
        probs = counts / counts.sum()
        entropy = -np.sum(probs[probs > 0] * np.log(probs[probs > 0]))
        metrics = {
            "psnr": mean_psnr,
            "codebook_usage": float(np.mean(counts > 0)),
            "perplexity": float(np.exp(entropy)),
        }
        if success is not None:
            metrics["verifier_success"] = success
        return metrics

    return Objective(name="vq_tokenizer", init=init, loss=loss, visualize=visualize, evaluate=evaluate)


def make_kl_objective(model: AutoencoderKL, *, kl_weight: float, recon_loss: str = "l1") -> Objective:
    """Objective training the KL autoencoder: loss = recon_loss + kl_weight * kl on sampled posteriors.

    Both terms are per-element means (pixels; latent elements, see `AutoencoderKL.__call__`), so `kl_weight` does
    not depend on resolution. For reference, LDM's kl_weight 1e-6 on per-image sums equals 1e-6 * 4 / (64 * 3),
    about 2e-8, here for an 8x-downsampling, 4-channel autoencoder. Needs the 'sample' rng (from the loss rng).

    Metrics: 'loss', 'recon_loss', 'kl', 'psnr'. Evaluation (posterior mean, no sampling): 'psnr', 'kl',
    'latent_std' (std of the posterior means over the eval set; diffusers' `scaling_factor` is 1 / this), and
    'verifier_success' on reconstructed targets when batches carry 'target_scene'.
    """
    recon_loss_fn = _recon_loss_fn(recon_loss)

    def init(rng: jax.Array, batch: Batch) -> dict[str, PyTree]:
        return model.init(rng, images_to_float(batch["source_image"]), sample_posterior=False)

    def loss(params, model_state, batch, rng):
        images = _training_images(batch)  # [2B, S, S, 3]
        recon, aux = model.apply({"params": params, **model_state}, images, sample_posterior=True, rngs={"sample": rng})
        recon = recon.astype(jnp.float32)
        reconstruction = recon_loss_fn(recon, images)
        total = reconstruction + kl_weight * aux["kl"]
        metrics = {"loss": total, "recon_loss": reconstruction, "kl": aux["kl"], "psnr": jnp.mean(psnr(recon, images))}
        return total, LossAux(metrics=metrics, model_state=model_state)

    @jax.jit  # Built once per objective: compiled once per eval batch shape, reused by visualize.
    def eval_forward(params, model_state, images_uint8):
        images = images_to_float(images_uint8)
        recon, aux = model.apply({"params": params, **model_state}, images)
        mean, latent_axes = aux["mean"], tuple(range(1, aux["mean"].ndim))
        per_image = {
            "kl": jnp.mean(gaussian_kl(mean, aux["logvar"]), axis=latent_axes),  # [N]
            "latent_mean": jnp.mean(mean, axis=latent_axes),  # [N]
            "latent_sq_mean": jnp.mean(jnp.square(mean), axis=latent_axes),  # [N]
        }
        return float_to_uint8(recon), psnr(recon, images), per_image

    def visualize(params, model_state, batch):
        return _visualize(eval_forward, params, model_state, batch)

    def evaluate(params, model_state, batches):
        mean_psnr, success, extras = _evaluate(eval_forward, params, model_state, batches)
        per_image = {key: np.concatenate([extra[key] for extra in extras]) for key in extras[0]}
        # Every image has the same latent size, so the mean of per-image moments is the eval-set moment.
        latent_variance = per_image["latent_sq_mean"].mean() - per_image["latent_mean"].mean() ** 2
        metrics = {
            "psnr": mean_psnr,
            "kl": float(per_image["kl"].mean()),
            "latent_std": float(np.sqrt(max(latent_variance, 0.0))),
        }
        if success is not None:
            metrics["verifier_success"] = success
        return metrics

    return Objective(name="kl_autoencoder", init=init, loss=loss, visualize=visualize, evaluate=evaluate)
