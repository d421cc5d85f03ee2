"""Tests for the conv trunk, the VQ tokenizer, the KL autoencoder and their training objectives (tiny configs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from editing_jax.data.world import edits
from editing_jax.methods import tokenizer
from editing_jax.models import autoencoder, vq
from editing_jax.nn import conv
from editing_jax.train import sharding

IMAGE_SIZE = 32
TINY_TRUNK = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
DOCUMENTED_AXES = {None, "conv_in", "conv_out", "embed", "kv", "codebook"}


def tiny_vq(**overrides) -> vq.VQModel:
    fields = dict(TINY_TRUNK, latent_channels=16, codebook_size=64, code_dim=8)
    return vq.VQModel(**{**fields, **overrides})


def tiny_kl(**overrides) -> autoencoder.AutoencoderKL:
    # No mid block here (the VQ model covers it): exercises the switch and keeps the init compile short.
    return autoencoder.AutoencoderKL(**{**TINY_TRUNK, "latent_channels": 4, "use_mid_block": False, **overrides})


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


def _array_batch(world_batch: dict) -> dict:
    return {key: world_batch[key] for key in ("source_image", "target_image")}


@pytest.fixture(scope="module")
def images(world_batch) -> jax.Array:
    return tokenizer.images_to_float(world_batch["source_image"])  # [2, 32, 32, 3]


def _init(objective, world_batch):
    # Objective.init is model.init on the source images. Jitted (eager init is slow on CPU) with an 'unsafe_rbg' key:
    # compiling hundreds of unrolled threefry hashes for the param initializers takes most of the time otherwise.
    # Each model is initialized once per module.
    return jax.jit(objective.init)(jax.random.key(0, impl="unsafe_rbg"), _array_batch(world_batch))


@pytest.fixture(scope="module")
def vq_objective(world_batch):
    """(model, objective, boxed init variables) of the tiny VQ tokenizer."""
    model = tiny_vq()
    objective = tokenizer.make_vq_objective(model)
    return model, objective, _init(objective, world_batch)


@pytest.fixture(scope="module")
def kl_objective(world_batch):
    model = tiny_kl()
    objective = tokenizer.make_kl_objective(model, kl_weight=1e-4)
    return model, objective, _init(objective, world_batch)


@pytest.fixture(scope="module")
def vq_setup(vq_objective):
    model, _, boxed = vq_objective
    return model, nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def vq_forward(vq_setup, images):
    """Eval-mode forward (recon, aux) of the tiny VQ model on `images`, computed once."""
    model, variables = vq_setup
    return jax.jit(model.apply)(variables, images)


@pytest.fixture(scope="module")
def kl_setup(kl_objective):
    model, _, boxed = kl_objective
    return model, nn.meta.unbox(boxed)


# ---- conv trunk --------------------------------------------------------------------------------------------------


def test_conv_params_carry_documented_logical_axes(vq_objective):
    _, _, variables = vq_objective
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


def test_param_and_state_shardings_follow_default_rules(vq_objective, world_batch):
    _, objective, _ = vq_objective
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
    abstract = jax.eval_shape(objective.init, jax.random.key(0), _array_batch(world_batch))
    shardings = sharding.tree_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
    assert shardings["params"]["encoder"]["conv_in"]["kernel"].spec == P(None, None, None, fsdp)
    assert shardings["params"]["encoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"].spec == P(None, fsdp)
    assert shardings["state"]["quantize"]["codebook"].spec == P(None, None)  # 'codebook' is replicated


def test_downsample_uses_asymmetric_padding():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
    block = conv.Downsample2D(1)
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks the top-left tap of each window
    out = block.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
    assert out.shape == (2, 3, 3, 1)
    np.testing.assert_array_equal(out, x[:, ::2, ::2])  # no top/left padding
    kernel = jnp.zeros((3, 3, 1, 1)).at[2, 2, 0, 0].set(1.0)  # bottom-right tap reaches the zero padding
    out = block.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
    np.testing.assert_array_equal(out[:, -1, :, 0], 0.0)
    np.testing.assert_array_equal(out[:, :-1, :-1], x[:, 2::2, 2::2])


# ---- VQ tokenizer ------------------------------------------------------------------------------------------------


def test_vq_shapes_and_aux(vq_setup, vq_forward, images):
    model, _ = vq_setup
    recon, aux = vq_forward
    factor = 2 ** (len(TINY_TRUNK["block_out_channels"]) - 1)
    assert model.downsample_factor == factor
    assert recon.shape == images.shape and recon.dtype == jnp.float32
    assert aux["indices"].shape == (2, IMAGE_SIZE // factor, IMAGE_SIZE // factor)
    assert aux["indices"].dtype == jnp.int32
    for key in ("commitment_loss", "perplexity", "codebook_usage", "restarted_codes"):
        assert aux[key].shape == ()
    assert 0 < float(aux["codebook_usage"]) <= 1
    assert 1 <= float(aux["perplexity"]) <= model.codebook_size


def test_vq_encode_decode_round_trip_matches_forward(vq_setup, vq_forward, images):
    model, variables = vq_setup
    recon, aux = vq_forward

    @jax.jit
    def encode_then_decode(variables, images):
        indices = model.apply(variables, images, method=vq.VQModel.encode)
        return indices, model.apply(variables, indices, method=vq.VQModel.decode_indices)

    indices, decoded = encode_then_decode(variables, images)
    np.testing.assert_array_equal(indices, aux["indices"])
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


def test_l2_normalized_codes_have_unit_norm():
    quantizer = vq.VectorQuantizer(8, 4, l2_normalize=True, dead_code_threshold=0.5)
    z = jax.random.normal(jax.random.key(2), (2, 3, 3, 4)) * 5.0  # [B, h, w, D], far from unit norm

    @jax.jit
    def init_eval_and_train(z, init_rng, restart_rng):
        variables = nn.meta.unbox(quantizer.init(init_rng, z))
        quantized, _ = quantizer.apply(variables, z)
        # A training step (EMA update of used codes + restart of dead ones) keeps every code on the unit sphere.
        variables["state"]["usage"] = variables["state"]["usage"].at[:3].set(0.0)  # codes 0-2 are dead
        rngs = {"restart": restart_rng}
        return variables, quantized, quantizer.apply(variables, z, train=True, mutable=["state"], rngs=rngs)

    variables, quantized, ((_, aux), new) = init_eval_and_train(z, jax.random.key(0), jax.random.key(1))
    np.testing.assert_allclose(jnp.linalg.norm(variables["state"]["codebook"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(quantized, axis=-1), 1.0, rtol=1e-5)
    assert int(aux["restarted_codes"]) >= 3
    assert not np.allclose(new["state"]["codebook"], variables["state"]["codebook"])
    np.testing.assert_allclose(jnp.linalg.norm(new["state"]["codebook"], axis=-1), 1.0, rtol=1e-5)


def test_error_weighted_restart_draws_the_worst_quantized_vectors():
    # Codes 0/1 are live; codes 2/3 are dead. The batch has 14 vectors at the live codes (zero error) and 2 far
    # outliers: uniform sampling would almost surely restart from the zero-error vectors, 'error' picks the outliers.
    codebook = np.array([[1.0, 1.0], [-1.0, -1.0], [50.0, 50.0], [-50.0, 50.0]], np.float32)
    rows = np.concatenate([np.tile([[1.0, 1.0]], (7, 1)), np.tile([[-1.0, -1.0]], (7, 1)), [[9.0, -9.0], [-9.0, 9.0]]])
    z = rows.astype(np.float32).reshape(1, 4, 4, 2)
    state = _quantizer_state(codebook, [4.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1e-3, 1e-3])
    quantizer = vq.VectorQuantizer(4, 2, ema_decay=0.99, dead_code_threshold=0.01, restart_sampling="error")
    (_, aux), new = quantizer.apply(state, z, train=True, mutable=["state"], rngs={"restart": jax.random.key(0)})
    assert int(aux["restarted_codes"]) == 2
    restarted = {tuple(code) for code in np.asarray(new["state"]["codebook"])[2:].tolist()}
    assert restarted == {(9.0, -9.0), (-9.0, 9.0)}
    with pytest.raises(ValueError, match="restart_sampling"):
        vq.VectorQuantizer(4, 2, restart_sampling="worst").init(jax.random.key(0), z)


def test_kmeans_plus_plus_covers_every_cluster_and_handles_duplicates():
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], np.float32)
    # 1,000 points at the first center, 1 at each of the others: uniform seeding would miss the small clusters.
    vectors = np.concatenate([np.repeat(centers[:1], 1000, axis=0), centers[1:]])
    codes = np.asarray(vq.kmeans_plus_plus(jax.random.key(0), jnp.asarray(vectors), 4))
    assert {tuple(c) for c in codes.tolist()} == {tuple(c) for c in centers.tolist()}
    # More codes than distinct vectors: every code is still a data vector.
    codes = np.asarray(vq.kmeans_plus_plus(jax.random.key(1), jnp.asarray(vectors), 9))
    assert codes.shape == (9, 2) and {tuple(c) for c in codes.tolist()} == {tuple(c) for c in centers.tolist()}


def test_patch_tokenizer_is_local_and_exact_on_its_codes(images):
    model = vq.VQModel(encoder_type="patch", decoder_type="patch", patch_size=2, code_dim=12, codebook_size=32)
    variables = model.init(jax.random.key(0), images)
    assert "params" not in variables and model.downsample_factor == 2
    blocks = model.apply(variables, images, method=vq.VQModel.encode_continuous)  # [2, 16, 16, 12]
    assert blocks.shape == (2, 16, 16, 12)
    np.testing.assert_array_equal(
        blocks[0, 3, 5].reshape(3, 2, 2), np.asarray(images[0, 6:8, 10:12]).transpose(2, 0, 1)
    )
    np.testing.assert_array_equal(model.apply(variables, blocks, method=vq.VQModel.decode_codes), images)
    tokens = model.apply(variables, images, method=vq.VQModel.encode)  # [2, 16, 16]
    changed = model.apply(variables, images.at[:, 4:6, 8:10].set(1.0), method=vq.VQModel.encode)
    differs = np.asarray(tokens != changed)
    assert not differs[:, np.arange(16) != 2].any() and not differs[:, :, np.arange(16) != 4].any()
    # A reconstruction is exactly the looked-up codes laid out as blocks.
    recon, aux = model.apply(variables, images)
    codebook = variables["state"]["quantize"]["codebook"].value
    expected = model.apply(variables, codebook[aux["indices"]], method=vq.VQModel.decode_codes)
    np.testing.assert_array_equal(recon, expected)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(encoder_type="patch", decoder_type="patch", code_dim=8), "code_dim"),
        (dict(encoder_type="pixels"), "encoder_type"),
        (dict(encoder_type="patch", decoder_type="conv", patch_size=4, code_dim=48, **TINY_TRUNK), "patch_size"),
        (dict(codebook_init="random"), "codebook_init"),
    ],
)
def test_bad_vq_layouts_are_rejected(fields, match, images):
    with pytest.raises(ValueError, match=match):
        vq.VQModel(**fields).init(jax.random.key(0), images)


def test_patch_tokenizer_trains_without_params_from_kmeans_plus_plus_seeds(world_batch):
    model = vq.VQModel(encoder_type="patch", decoder_type="patch", code_dim=12, codebook_size=8,
                       commitment_weight=0.0, codebook_init="kmeans++", restart_sampling="error")  # fmt: skip
    objective = tokenizer.make_vq_objective(model, recon_loss="l2")
    variables = jax.jit(objective.init)(jax.random.key(0), _array_batch(world_batch))
    state = nn.meta.unbox(variables)
    assert set(state) == {"state"}
    seeded = np.asarray(state["state"]["quantize"]["codebook"])
    blocks = np.asarray(model.apply(state, tokenizer._training_images(world_batch),
                                    method=vq.VQModel.encode_continuous)).reshape(-1, 12)  # fmt: skip
    # Every seed is a training block (up to the rounding of jit-fused uint8 -> float conversions).
    assert all(np.any(np.all(np.abs(blocks - code) < 1e-6, axis=-1)) for code in seeded)
    loss_fn = jax.jit(lambda s, rng: objective.loss({}, s, _array_batch(world_batch), rng))
    first, aux = loss_fn(state, jax.random.key(1))
    for step in range(5):
        loss, aux = loss_fn(aux.model_state, jax.random.key(step))
    assert float(loss) < float(first)  # EMA (online k-means) steps lower the reconstruction error


# ---- KL autoencoder ----------------------------------------------------------------------------------------------


def test_kl_closed_form_and_non_negative(kl_setup, images):
    mean = jnp.array([0.0, 1.0, -2.0, 0.5])
    logvar = jnp.array([0.0, np.log(2.0), -1.0, 3.0])
    expected = 0.5 * (np.square(mean) + np.exp(logvar) - 1.0 - logvar)
    np.testing.assert_allclose(autoencoder.gaussian_kl(mean, logvar), expected, rtol=1e-6)
    assert float(autoencoder.gaussian_kl(0.0, 0.0)) == 0.0

    model, variables = kl_setup

    @jax.jit
    def run(variables, images, rng):
        recon, aux = model.apply(variables, images)
        mean, _ = model.apply(variables, images, method=autoencoder.AutoencoderKL.encode)
        decoded = model.apply(variables, mean, method=autoencoder.AutoencoderKL.decode)
        sampled, _ = model.apply(variables, images, sample_posterior=True, rngs={"sample": rng})
        return recon, aux, mean, decoded, sampled

    recon, aux, mean, decoded, sampled = run(variables, images, jax.random.key(1))
    factor = model.downsample_factor
    assert recon.shape == images.shape
    assert aux["mean"].shape == (2, IMAGE_SIZE // factor, IMAGE_SIZE // factor, 4)
    assert float(aux["kl"]) >= 0.0
    np.testing.assert_allclose(aux["kl"], jnp.mean(autoencoder.gaussian_kl(aux["mean"], aux["logvar"])), rtol=1e-6)
    np.testing.assert_array_equal(mean, aux["mean"])
    np.testing.assert_allclose(decoded, recon, atol=1e-5)
    assert not np.allclose(sampled, recon)


def test_latent_normalization_round_trip():
    model = tiny_kl(scaling_factor=0.5, shift_factor=0.1)
    latents = jnp.linspace(-2.0, 2.0, 8)
    np.testing.assert_allclose(model.normalize_latents(latents), (latents - 0.1) * 0.5)
    np.testing.assert_allclose(model.denormalize_latents(model.normalize_latents(latents)), latents, rtol=1e-6)


# ---- dtypes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_bfloat16_activations_with_float32_params(kind, vq_setup, kl_setup, images):
    model = (tiny_vq if kind == "vq" else tiny_kl)(dtype=jnp.bfloat16)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)
    assert {p.dtype for p in jax.tree.leaves(nn.meta.unbox(abstract["params"]))} == {jnp.dtype(jnp.float32)}
    _, variables = vq_setup if kind == "vq" else kl_setup  # same tree as the bfloat16 model's init
    # Abstract evaluation gives every intermediate's dtype without compiling.
    apply = lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])  # noqa: E731
    (recon, _), state = jax.eval_shape(apply, variables, images)
    assert recon.dtype == jnp.bfloat16
    trunk = {key: state["intermediates"][key] for key in ("encoder", "decoder")}
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(trunk)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes


# ---- objectives --------------------------------------------------------------------------------------------------


def _objective_and_variables(setup):
    _, objective, boxed = setup
    variables = dict(nn.meta.unbox(boxed))
    params = variables.pop("params")
    return objective, params, variables


def test_image_conversions_round_trip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    floats = tokenizer.images_to_float(pixels)
    assert floats.dtype == jnp.float32 and float(floats.min()) == -1.0 and float(floats.max()) == 1.0
    np.testing.assert_array_equal(tokenizer.float_to_uint8(floats), pixels)
    np.testing.assert_array_equal(tokenizer.float_to_uint8(jnp.array([-3.0, 3.0])), [0, 255])


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_few_steps_of_training_reduce_the_loss(kind, world_batch, vq_objective, kl_objective):
    objective, params, model_state = _objective_and_variables(vq_objective if kind == "vq" else kl_objective)
    batch = _array_batch(world_batch)
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(params, model_state, opt_state, rng):
        (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, model_state, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), aux.model_state, opt_state, loss, aux.metrics

    opt_state = optimizer.init(params)
    initial_state = model_state
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
    if kind == "vq":  # the EMA codebook state is threaded through the loss
        assert not np.allclose(
            model_state["state"]["quantize"]["codebook"], initial_state["state"]["quantize"]["codebook"]
        )
    else:
        assert model_state == {}


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_visualize_and_evaluate(kind, world_batch, vq_objective, kl_objective, monkeypatch):
    objective, params, model_state = _objective_and_variables(vq_objective if kind == "vq" else kl_objective)
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

    # The verifier scores the reconstructed *targets* of every batch against their target scenes.
    calls = []
    monkeypatch.setattr(tokenizer, "_verifier_success", lambda images, scenes: calls.append((images, scenes)) or 0.25)
    assert objective.evaluate(params, model_state, [world_batch, world_batch])["verifier_success"] == 0.25
    ((verified_images, verified_scenes),) = calls
    assert verified_scenes == list(world_batch["target_scene"]) * 2
    target_reconstructions = [row[1] for row in rows[2:]] * 2  # visualize rows: sources, then targets
    for image, expected in zip(verified_images, target_reconstructions, strict=True):
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image.astype(np.float32) / 255.0, expected)


@pytest.mark.parametrize("norm_type, local", [("group", False), ("layer", True)])
def test_layer_norm_trunk_keeps_latents_local(norm_type, local):
    encoder = conv.Encoder(4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                           mid_block_attention=False, norm_type=norm_type)  # fmt: skip
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
    variables = encoder.init(jax.random.key(0), images)
    far_change = images.at[:, :4, :4].add(3.0)  # top-left corner
    a, b = encoder.apply(variables, images), encoder.apply(variables, far_change)  # [1, 16, 16, 4]
    corner_unchanged = np.allclose(np.asarray(a[:, -4:, -4:]), np.asarray(b[:, -4:, -4:]), atol=1e-6)
    assert corner_unchanged == local  # GroupNorm statistics carry the change across the image
