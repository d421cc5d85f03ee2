"""Numerical parity of our VQ tokenizer with diffusers' `VQModel`, through `editing_jax.convert.vq`.

What matches (checked here, float32, relative error max|ours - torch| / max|torch| <= 1e-5): a diffusers `VQModel`
with `act_fn='silu'`, `norm_type='group'`, `DownEncoderBlock2D`/`UpDecoderBlock2D` blocks, `vq_embed_dim=code_dim`,
`mid_block_add_attention=mid_block_attention` (`diffusers_vq_config` builds it) equals our `VQModel(use_mid_block=True,
l2_normalize_codes=False)` module for module:
  * encoder + quant_conv (pre-quantization latents), for 2 levels with mid-block attention and for 3 levels,
    2 resnets per block, channel-changing shortcuts and no mid-block attention;
  * nearest-code lookup: token indices are identical;
  * decode from indices (diffusers `decode(indices, force_not_quantize=True, shape=...)` with `lookup_from_codebook`);
  * the full reconstruction `model(images)`. diffusers returns `z + (z_q - z).detach()` (off from `z_q` by rounding)
    where our straight-through estimator returns `z_q` exactly; the difference is far inside the tolerance.
What does not match, by design:
  * the loss: diffusers' `commit_loss` is (1 + beta) * mean((z - z_q)^2) (codebook + commitment terms, legacy beta
    placement); our codebook is learned by EMA, so only beta * mean((z - z_q)^2) is returned. The squared error agrees.
  * training: diffusers' codebook is a parameter; ours lives in the 'state' collection with EMA statistics
    (converted checkpoints get fresh statistics).
  * no counterpart: diffusers' `norm_type='spatial'` (MoVQ decoder norms conditioned on the codes), other block types
    or activations, index `remap`; our `use_mid_block=False` and `l2_normalize_codes=True` (cosine lookup).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from editing_jax.convert import vq as convert  # noqa: E402
from editing_jax.models.vq import VQModel  # noqa: E402
from tests.helpers.parity import relative_error  # noqa: E402

TOLERANCE = 1e-5
BATCH, SIZE = 2, 16
CONFIGS = {
    "two_levels_attention": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16, codebook_size=48,
        code_dim=8,
    ),
    "three_levels_no_attention": dict(
        block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=12, codebook_size=40,
        code_dim=6, mid_block_attention=False,
    ),
}  # fmt: skip


def _nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _randomize(module: torch.nn.Module) -> None:
    """Re-draws every parameter: norm weights 1 + N(0, 0.2^2), biases N(0, 0.1^2), weights N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name == "quantize.embedding.weight":
                continue  # drawn from the encoder's statistics below
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    """(our model, converted variables, torch model, images NCHW torch / NHWC numpy) for one configuration."""
    torch.manual_seed(0)
    model = VQModel(**CONFIGS[request.param])
    reference = diffusers.VQModel(**convert.diffusers_vq_config(model)).eval()
    _randomize(reference)
    images = torch.rand(BATCH, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():  # Codes around the encoder outputs' scale, so the lookup is not trivial.
        latents = reference.encode(images).latents
        codebook = reference.quantize.embedding.weight
        codebook.copy_(latents.mean() + latents.std() * torch.randn_like(codebook))
    state_dict = {key: value.numpy() for key, value in reference.state_dict().items()}
    variables = convert.vq_variables_from_torch(state_dict, model=model)
    return model, variables, reference, images, _nchw_to_nhwc(images)


def test_config_round_trip(pair):
    model, _, reference, _, _ = pair
    kwargs = convert.vq_model_kwargs_from_diffusers_config(dict(reference.config))
    assert VQModel(**kwargs) == model.clone(**{k: v for k, v in kwargs.items() if k != "l2_normalize_codes"})


def test_encoder_and_quant_conv_match(pair):
    model, variables, reference, images, images_nhwc = pair
    with torch.no_grad():
        expected = _nchw_to_nhwc(reference.encode(images).latents)  # [B, h, w, D]
    ours = model.apply(variables, images_nhwc, method=VQModel.encode_continuous)
    assert relative_error(ours, expected) <= TOLERANCE


def test_token_indices_are_identical(pair):
    model, variables, reference, images, images_nhwc = pair
    with torch.no_grad():
        latents = reference.encode(images).latents
        _, _, (_, _, indices) = reference.quantize(latents)
    factor = model.downsample_factor
    expected = indices.numpy().reshape(BATCH, SIZE // factor, SIZE // factor)
    assert len(np.unique(expected)) > 4  # a non-trivial assignment
    np.testing.assert_array_equal(model.apply(variables, images_nhwc, method=VQModel.encode), expected)


def test_decode_from_indices_matches(pair):
    model, variables, reference, _, _ = pair
    grid = SIZE // model.downsample_factor
    indices = np.random.default_rng(0).integers(0, model.codebook_size, (BATCH, grid, grid))
    with torch.no_grad():
        expected = reference.decode(
            torch.from_numpy(indices), force_not_quantize=True, shape=(BATCH, grid, grid, model.code_dim)
        ).sample
    ours = model.apply(variables, indices, method=VQModel.decode_indices)
    assert relative_error(ours, _nchw_to_nhwc(expected)) <= TOLERANCE


def test_full_reconstruction_matches(pair):
    model, variables, reference, images, images_nhwc = pair
    with torch.no_grad():
        output = reference(images)
    recon, aux = model.apply(variables, images_nhwc)
    assert relative_error(recon, _nchw_to_nhwc(output.sample)) <= TOLERANCE
    # Same squared error under different loss definitions (see the module docstring).
    beta = model.commitment_weight
    np.testing.assert_allclose(float(aux["commitment_loss"]) / beta, float(output.commit_loss) / (1 + beta), rtol=1e-5)


def test_converted_state_is_fresh_and_params_cast():
    torch.manual_seed(1)
    model = VQModel(**CONFIGS["two_levels_attention"])
    reference = diffusers.VQModel(**convert.diffusers_vq_config(model))
    state_dict = {key: value.numpy() for key, value in reference.state_dict().items()}
    variables = convert.vq_variables_from_torch(state_dict, model=model, dtype=np.float16)
    state = variables["state"]["quantize"]
    np.testing.assert_array_equal(state["codebook"], state_dict["quantize.embedding.weight"])
    assert state["codebook"].dtype == np.float32
    assert not state["cluster_size"].any() and not state["embed_sum"].any() and (state["usage"] == 1).all()
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables["params"])} == {np.dtype(np.float16)}


def test_mismatches_are_rejected():
    model = VQModel(**CONFIGS["two_levels_attention"])
    config = convert.diffusers_vq_config(model)
    for bad in (dict(norm_type="spatial"), dict(act_fn="relu"), dict(up_block_types=("AttnUpDecoderBlock2D",) * 2)):
        with pytest.raises(ValueError):
            convert.vq_model_kwargs_from_diffusers_config({**config, **bad})
    with pytest.raises(ValueError, match="mid block"):
        convert.diffusers_vq_config(model.clone(use_mid_block=False))
    with pytest.raises(ValueError, match="L2"):
        convert.diffusers_vq_config(model.clone(l2_normalize_codes=True))

    torch.manual_seed(2)
    state_dict = {key: value.numpy() for key, value in diffusers.VQModel(**config).state_dict().items()}
    # A model without mid-block attention lacks `attentions_0`: the check names the leftovers.
    with pytest.raises(ValueError, match="attentions_0"):
        convert.vq_variables_from_torch(state_dict, model=model.clone(mid_block_attention=False))
    with pytest.raises(ValueError, match="shape mismatches"):
        convert.vq_variables_from_torch(state_dict, model=model.clone(code_dim=4))
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        convert.vq_variables_from_torch({k: v for k, v in state_dict.items() if not k.startswith("quantize.")})


def test_deprecated_attention_names_and_safetensors_loading(tmp_path):
    """Old diffusers checkpoints name the mid-block attention query/key/value/proj_attn; files load from disk."""
    from safetensors.numpy import save_file

    torch.manual_seed(3)
    model = VQModel(**CONFIGS["two_levels_attention"])
    config = convert.diffusers_vq_config(model)
    state_dict = {key: value.numpy() for key, value in diffusers.VQModel(**config).state_dict().items()}
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in state_dict.items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[f"vqvae.{key}"] = value
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = convert.load_safetensors_vq(tmp_path / "diffusion_pytorch_model.safetensors", model=model, prefix="vqvae")
    expected = convert.vq_variables_from_torch(state_dict, model=model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, expected)

    # A folder as diffusers' own `save_pretrained` writes it (config.json + diffusion_pytorch_model.safetensors).
    reference = diffusers.VQModel(**config)
    reference.load_state_dict({key: torch.from_numpy(value) for key, value in state_dict.items()})
    reference.save_pretrained(tmp_path / "vqvae", safe_serialization=True)
    pretrained, variables = convert.load_pretrained_vq(tmp_path / "vqvae", dead_code_threshold=0.0)
    assert pretrained == model.clone(dead_code_threshold=0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)
