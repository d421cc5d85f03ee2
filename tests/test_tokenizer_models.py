"""Tests for the conv trunk, the VQ tokenizer, the KL autoencoder and their training objectives (tiny configs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from editing_jax.data.world import edits
from editing_jax.methods import tokenizer
from editing_jax.models import autoencoder, vq
from editing_jax.nn import conv

IMAGE_SIZE = 32
TINY_TRUNK = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
DOCUMENTED_AXES = {None, "conv_in", "conv_out", "embed", "kv", "codebook"}


def tiny_vq(**overrides) -> vq.VQModel:
    fields = dict(TINY_TRUNK, latent_channels=16, codebook_size=64, code_dim=8)
    return vq.VQModel(**{**fields, **overrides})


def tiny_kl(**overrides) -> autoencoder.AutoencoderKL:
    return autoencoder.AutoencoderKL(**{**TINY_TRUNK, "latent_channels": 4, **overrides})


@pytest.fixture(scope="module")
def world_batch() -> dict:
    """Two synthetic-world edits at 32 px, stacked like a pipeline batch (arrays stacked, strings as lists)."""
    examples = [edits.generate_sample("train", 0, i, edits.WorldConfig(size=IMAGE_SIZE)).to_example() for i in range(2)]
    return {
        key: np.stack([ex[key] for ex in examples])
        if isinstance(examples[0][key], np.ndarray)
        else [ex[key] for ex in examples]
        for key in examples[0]
    }


@pytest.fixture(scope="module")
def images(world_batch) -> jax.Array:
    return tokenizer.images_to_float(world_batch["source_image"])  # [2, 32, 32, 3]


@pytest.fixture(scope="module")
def vq_boxed(images):
    """Tiny VQ model and its init variables with logical-partitioning boxes (jitted: eager init is slow)."""
    model = tiny_vq()
    return model, jax.jit(model.init)(jax.random.key(0), images)


@pytest.fixture(scope="module")
def vq_setup(vq_boxed):
    model, boxed = vq_boxed
    return model, nn.meta.unbox(boxed)


def _array_batch(world_batch: dict) -> dict:
    return {key: world_batch[key] for key in ("source_image", "target_image")}


# ---- conv trunk --------------------------------------------------------------------------------------------------


def test_conv_params_carry_documented_logical_axes(vq_boxed):
    _, variables = vq_boxed
    boxed = variables["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    assert {name for leaf in leaves for name in leaf.names} <= DOCUMENTED_AXES
    assert boxed["encoder"]["conv_in"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert boxed["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].names == ("embed", "kv")
    # diffusers-style names: resnet shortcut only where channels change, downsampler on all but the last level.
    encoder = boxed["encoder"]
    assert "conv_shortcut" in encoder["down_blocks_1"]["resnets_0"]
    assert "conv_shortcut" not in encoder["down_blocks_0"]["resnets_0"]
    assert "downsamplers_0" in encoder["down_blocks_0"] and "downsamplers_0" not in encoder["down_blocks_1"]
    assert set(boxed["decoder"]["up_blocks_0"]) == {"resnets_0", "resnets_1", "upsamplers_0"}


def test_downsample_uses_asymmetric_padding():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
    block = conv.Downsample2D(1)
    params = block.init(jax.random.key(0), x)
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks the top-left tap of each window
    out = block.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
    assert out.shape == (2, 3, 3, 1)
    np.testing.assert_array_equal(out, x[:, ::2, ::2])  # no top/left padding
    kernel = jnp.zeros((3, 3, 1, 1)).at[2, 2, 0, 0].set(1.0)  # bottom-right tap reaches the zero padding
    out = block.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
    np.testing.assert_array_equal(out[:, -1, :, 0], 0.0)
    np.testing.assert_array_equal(out[:, :-1, :-1], x[:, 2::2, 2::2])
    del params


# ---- VQ tokenizer ------------------------------------------------------------------------------------------------


def test_vq_shapes_and_aux(vq_setup, images):
    model, variables = vq_setup
    recon, aux = model.apply(variables, images)
    factor = 2 ** (len(TINY_TRUNK["block_out_channels"]) - 1)
    assert model.downsample_factor == factor
    assert recon.shape == images.shape and recon.dtype == jnp.float32
    assert aux["indices"].shape == (2, IMAGE_SIZE // factor, IMAGE_SIZE // factor)
    assert aux["indices"].dtype == jnp.int32
    for key in ("commitment_loss", "perplexity", "codebook_usage", "restarted_codes"):
        assert aux[key].shape == ()
    assert 0 < float(aux["codebook_usage"]) <= 1
    assert 1 <= float(aux["perplexity"]) <= model.codebook_size


def test_vq_encode_decode_round_trip_matches_forward(vq_setup, images):
    model, variables = vq_setup
    recon, aux = model.apply(variables, images)
    indices = model.apply(variables, images, method=vq.VQModel.encode)
    np.testing.assert_array_equal(indices, aux["indices"])
    decoded = model.apply(variables, indices, method=vq.VQModel.decode_indices)
    np.testing.assert_allclose(decoded, recon, atol=1e-6)


def test_straight_through_gradient_reaches_encoder(vq_setup, images):
    model, variables = vq_setup

    def recon_loss(params):
        recon, _ = model.apply({**variables, "params": params}, images)
        return jnp.mean(jnp.abs(recon - images))

    grads = jax.jit(jax.grad(recon_loss))(variables["params"])
    for path in (("encoder", "conv_in", "kernel"), ("quant_conv", "kernel"), ("decoder", "conv_out", "kernel")):
        grad = grads
        for key in path:
            grad = grad[key]
        assert float(jnp.abs(grad).max()) > 0, path


def _quantizer_state(codebook, cluster_size, usage):
    codebook = jnp.asarray(codebook, jnp.float32)
    cluster_size = jnp.asarray(cluster_size, jnp.float32)
    return {
        "state": {
            "codebook": codebook,
            "cluster_size": cluster_size,
            "embed_sum": codebook * cluster_size[:, None],
            "usage": jnp.asarray(usage, jnp.float32),
        }
    }


def test_ema_update_moves_used_codes_and_keeps_unused_codes():
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]], np.float32)
    z = np.array([[1.0, 0.0], [0.0, 1.0], [9.0, 0.0], [11.0, 2.0]], np.float32).reshape(1, 2, 2, 2)
    decay, epsilon = 0.5, 1e-5
    quantizer = vq.VectorQuantizer(4, 2, ema_decay=decay, ema_epsilon=epsilon, dead_code_threshold=0.0)
    state = _quantizer_state(codebook, [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    (quantized, aux), new = quantizer.apply(state, z, train=True, mutable=["state"])

    np.testing.assert_array_equal(aux["indices"].reshape(-1), [0, 0, 1, 1])
    np.testing.assert_array_equal(quantized.reshape(4, 2), codebook[[0, 0, 1, 1]])  # pre-update codes
    flat = z.reshape(4, 2)
    counts = np.array([2.0, 2.0, 0.0, 0.0])
    sums = np.stack([flat[:2].sum(0), flat[2:].sum(0), np.zeros(2), np.zeros(2)])
    cluster_size = decay * 1.0 + (1 - decay) * counts
    embed_sum = decay * codebook + (1 - decay) * sums
    smoothed = (cluster_size + epsilon) / (cluster_size.sum() + 4 * epsilon) * cluster_size.sum()
    expected = embed_sum / smoothed[:, None]
    new_codebook = np.asarray(new["state"]["codebook"])
    np.testing.assert_allclose(new_codebook[:2], expected[:2], rtol=1e-6)
    np.testing.assert_array_equal(new_codebook[2:], codebook[2:])  # unused codes: exactly unchanged
    np.testing.assert_allclose(new["state"]["cluster_size"], cluster_size, rtol=1e-6)
    np.testing.assert_allclose(new["state"]["usage"], decay + (1 - decay) * counts * 4 / 4, rtol=1e-6)
    for code, assigned in ((0, flat[:2]), (1, flat[2:])):  # used codes moved toward their assigned mean
        before = np.linalg.norm(codebook[code] - assigned.mean(0))
        assert np.linalg.norm(new_codebook[code] - assigned.mean(0)) < before
    assert int(aux["restarted_codes"]) == 0


def test_dead_code_restart_replaces_exactly_the_dead_codes():
    rng = np.random.default_rng(0)
    codebook = np.array([[1.0, 1.0], [-1.0, -1.0], [50.0, 50.0], [-50.0, 50.0]], np.float32)
    z = (rng.normal(size=(16, 2)) * 0.3 + np.where(np.arange(16)[:, None] < 8, 1.0, -1.0)).astype(np.float32)
    z = z.reshape(1, 4, 4, 2)
    state = _quantizer_state(codebook, [4.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1e-3, 1e-3])

    def step(threshold):
        quantizer = vq.VectorQuantizer(4, 2, ema_decay=0.99, dead_code_threshold=threshold)
        rngs = {"restart": jax.random.key(3)}
        return quantizer.apply(state, z, train=True, mutable=["state"], rngs=rngs)

    (_, aux), new = step(0.01)
    (_, _), reference = step(0.0)
    new_codebook = np.asarray(new["state"]["codebook"])
    assert int(aux["restarted_codes"]) == 2
    np.testing.assert_array_equal(new_codebook[:2], reference["state"]["codebook"][:2])  # live codes: plain EMA
    rows = z.reshape(16, 2)
    for code in (2, 3):
        assert np.any(np.all(rows == new_codebook[code], axis=-1)), f"code {code} is not an encoder output"
    assert not np.array_equal(new_codebook[2], new_codebook[3])  # drawn without replacement
    np.testing.assert_array_equal(new["state"]["usage"][2:], 1.0)
    np.testing.assert_array_equal(new["state"]["cluster_size"][2:], 0.0)
    np.testing.assert_array_equal(new["state"]["embed_sum"][2:], 0.0)


def test_l2_normalized_codes_have_unit_norm(images):
    model = tiny_vq(l2_normalize_codes=True, dead_code_threshold=0.5)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images))
    norms = jnp.linalg.norm(variables["state"]["quantize"]["codebook"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    variables["state"]["quantize"]["usage"] = variables["state"]["quantize"]["usage"].at[:10].set(0.0)  # force restarts
    train_apply = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=["state"], rngs={"restart": rng}))
    (_, aux), new = train_apply(variables, images, jax.random.key(1))
    assert int(aux["restarted_codes"]) >= 10
    np.testing.assert_allclose(jnp.linalg.norm(new["state"]["quantize"]["codebook"], axis=-1), 1.0, rtol=1e-5)
    quantizer = vq.VectorQuantizer(8, 4, l2_normalize=True)
    z = jax.random.normal(jax.random.key(2), (2, 3, 3, 4)) * 5.0
    quantized, _ = quantizer.apply(quantizer.init(jax.random.key(0), z), z)
    np.testing.assert_allclose(jnp.linalg.norm(quantized, axis=-1), 1.0, rtol=1e-5)


# ---- KL autoencoder ----------------------------------------------------------------------------------------------


def test_kl_closed_form_and_non_negative(images):
    mean = jnp.array([0.0, 1.0, -2.0, 0.5])
    logvar = jnp.array([0.0, np.log(2.0), -1.0, 3.0])
    expected = 0.5 * (np.square(mean) + np.exp(logvar) - 1.0 - logvar)
    np.testing.assert_allclose(autoencoder.gaussian_kl(mean, logvar), expected, rtol=1e-6)
    assert float(autoencoder.gaussian_kl(0.0, 0.0)) == 0.0

    model = tiny_kl()
    variables = jax.jit(model.init)(jax.random.key(0), images)
    recon, aux = jax.jit(model.apply)(variables, images)
    factor = model.downsample_factor
    assert recon.shape == images.shape
    assert aux["mean"].shape == (2, IMAGE_SIZE // factor, IMAGE_SIZE // factor, 4)
    assert float(aux["kl"]) >= 0.0
    np.testing.assert_allclose(aux["kl"], jnp.mean(autoencoder.gaussian_kl(aux["mean"], aux["logvar"])), rtol=1e-6)
    mean_out, logvar_out = model.apply(variables, images, method=autoencoder.AutoencoderKL.encode)
    np.testing.assert_allclose(
        model.apply(variables, mean_out, method=autoencoder.AutoencoderKL.decode), recon, atol=1e-5
    )
    sampled, _ = model.apply(variables, images, sample_posterior=True, rngs={"sample": jax.random.key(1)})
    assert not np.allclose(sampled, recon)
    del logvar_out


def test_latent_normalization_round_trip():
    model = tiny_kl(scaling_factor=0.5, shift_factor=0.1)
    latents = jnp.linspace(-2.0, 2.0, 8)
    np.testing.assert_allclose(model.normalize_latents(latents), (latents - 0.1) * 0.5)
    np.testing.assert_allclose(model.denormalize_latents(model.normalize_latents(latents)), latents, rtol=1e-6)


# ---- dtypes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [tiny_vq, tiny_kl], ids=["vq", "kl"])
def test_bfloat16_activations_with_float32_params(make_model, images):
    model = make_model(dtype=jnp.bfloat16)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables["params"])))
    apply = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))
    (recon, _), state = apply(variables, images)
    assert recon.dtype == jnp.bfloat16
    trunk = {key: state["intermediates"][key] for key in ("encoder", "decoder")}
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(trunk)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes


# ---- objectives --------------------------------------------------------------------------------------------------


def _objective_and_variables(kind, world_batch):
    objective = tokenizer.make_vq_objective(tiny_vq()) if kind == "vq" else tokenizer.make_kl_objective(tiny_kl())
    variables = nn.meta.unbox(jax.jit(objective.init)(jax.random.key(0), _array_batch(world_batch)))
    params = variables.pop("params")
    return objective, params, variables


def test_image_conversions_round_trip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    floats = tokenizer.images_to_float(pixels)
    assert floats.dtype == jnp.float32 and float(floats.min()) == -1.0 and float(floats.max()) == 1.0
    np.testing.assert_array_equal(tokenizer.float_to_uint8(floats), pixels)
    np.testing.assert_array_equal(tokenizer.float_to_uint8(jnp.array([-3.0, 3.0])), [0, 255])


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_few_steps_of_training_reduce_the_loss(kind, world_batch):
    objective, params, model_state = _objective_and_variables(kind, world_batch)
    batch = _array_batch(world_batch)
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(params, model_state, opt_state, rng):
        (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, model_state, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), aux.model_state, opt_state, loss, aux.metrics

    opt_state = optimizer.init(params)
    losses = []
    for step in range(30):
        params, model_state, opt_state, loss, metrics = train_step(params, model_state, opt_state, jax.random.key(step))
        losses.append(float(loss))
    assert all(np.shape(value) == () for value in metrics.values())
    expected = {"loss", "recon_loss", "psnr"} | (
        {"commitment_loss", "codebook_usage", "perplexity", "restarted_codes"} if kind == "vq" else {"kl"}
    )
    assert set(metrics) == expected
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_visualize_and_evaluate(kind, world_batch):
    objective, params, model_state = _objective_and_variables(kind, world_batch)
    rows, labels = objective.visualize(params, model_state, world_batch)
    assert labels == ["original", "reconstruction"] and len(rows) == 4
    assert rows[0][0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and 0.0 <= rows[0][1].min() <= rows[0][1].max() <= 1.0
    metrics = objective.evaluate(params, model_state, [world_batch, world_batch])
    assert np.isfinite(metrics["psnr"]) and 0.0 <= metrics["verifier_success"] <= 1.0
    if kind == "vq":
        assert 0.0 < metrics["codebook_usage"] <= 1.0 and metrics["perplexity"] >= 1.0
    else:
        assert metrics["kl"] >= 0.0 and metrics["latent_std"] > 0.0
    without_scenes = objective.evaluate(params, model_state, [_array_batch(world_batch)])
    assert "verifier_success" not in without_scenes
    np.testing.assert_allclose(without_scenes["psnr"], metrics["psnr"], rtol=1e-5)
