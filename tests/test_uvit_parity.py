"""Numerical parity of `editing_jax.nn.uvit` with diffusers' token-grid modules, through `editing_jax.convert.uvit`.

Tiny random torch modules (float32, fixed seed, every weight re-drawn, RMSNorm scales around 1 so no scale is
trivial) run next to our NHWC modules with converted weights:
  * `UVit2DConvEmbed` vs `ConvEmbed`, `ConvMlmLayer` vs `ConvMlmLayer` (with and without biases);
  * `Downsample2D(channels, use_conv=True, padding=0, name='Conv2d_0', kernel_size=2, norm_type='rms_norm', ...)` vs
    `Downsample` and `Upsample2D(channels, use_conv_transpose=True, kernel_size=2, padding=0, name='conv',
    norm_type='rms_norm', ..., interpolate=False)` vs `Upsample`, exactly as Meissonic's `Simple_UVitBlock` builds
    them (odd grids included for the downsample: diffusers pads bottom/right by one);
  * the Meissonic-layout helper `mgt_embed_and_head_from_torch` (prefixes, Simple_UVitBlock nesting, mask-row remap).
The error measure is max |ours - torch| / max |torch|.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.models.downsampling import Downsample2D  # noqa: E402
from diffusers.models.unets.uvit_2d import ConvMlmLayer as TorchConvMlmLayer  # noqa: E402
from diffusers.models.unets.uvit_2d import UVit2DConvEmbed  # noqa: E402
from diffusers.models.upsampling import Upsample2D  # noqa: E402

from editing_jax.convert import uvit as convert  # noqa: E402
from editing_jax.convert.conv_trunk import check_tree  # noqa: E402
from editing_jax.models.mgt import MaskedGenerativeTransformer  # noqa: E402
from editing_jax.nn import uvit  # noqa: E402
from tests.helpers.parity import relative_error  # noqa: E402

EPS = 1e-6
VOCAB, EMBED, WIDTH, CODEBOOK = 37, 24, 32, 29
TOLERANCE = 1e-5


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Re-draws every parameter: norm weights 1 + N(0, 0.2^2), the rest N(0, 1/fan_in) (biases N(0, 0.1^2))."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif param.ndim == 2:  # embedding table
                param.normal_(0.0, 1.0)
            else:
                fan_in = param.shape[0 if isinstance(module, Upsample2D) else 1] * param[0, 0].numel()
                param.normal_(0.0, fan_in**-0.5)
    return module.eval()


def _state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in module.state_dict().items()}


def _nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _torch_downsample(channels: int, bias: bool) -> Downsample2D:
    return Downsample2D(
        channels,
        use_conv=True,
        padding=0,
        name="Conv2d_0",
        kernel_size=2,
        norm_type="rms_norm",
        eps=EPS,
        elementwise_affine=True,
        bias=bias,
    )


def _torch_upsample(channels: int, bias: bool) -> Upsample2D:
    return Upsample2D(
        channels,
        use_conv_transpose=True,
        kernel_size=2,
        padding=0,
        name="conv",
        norm_type="rms_norm",
        eps=EPS,
        elementwise_affine=True,
        bias=bias,
        interpolate=False,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_embed_matches_diffusers(bias):
    reference = _randomize(UVit2DConvEmbed(EMBED, WIDTH, VOCAB, elementwise_affine=True, eps=EPS, bias=bias))
    ids = torch.randint(0, VOCAB, (2, 6, 5))
    with torch.no_grad():
        expected = _nchw_to_nhwc(reference(ids))  # [B, H, W, D]
    params = convert.conv_embed_from_torch(_state_dict(reference))
    ours = uvit.ConvEmbed(VOCAB, EMBED, WIDTH, use_bias=bias).apply({"params": params}, ids.numpy())
    assert relative_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("bias", [False, True])
def test_conv_mlm_layer_matches_diffusers(bias):
    reference = _randomize(
        TorchConvMlmLayer(WIDTH, EMBED, bias, ln_elementwise_affine=True, layer_norm_eps=EPS, codebook_size=CODEBOOK)
    )
    x = torch.randn(2, WIDTH, 6, 5)
    with torch.no_grad():
        expected = _nchw_to_nhwc(reference(x))  # [B, H, W, V]
    params = convert.conv_mlm_layer_from_torch(_state_dict(reference))
    ours = uvit.ConvMlmLayer(EMBED, CODEBOOK, use_bias=bias).apply({"params": params}, _nchw_to_nhwc(x))
    assert relative_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(8, 6), (7, 5)])
def test_downsample_matches_diffusers(bias, size):
    reference = _randomize(_torch_downsample(WIDTH, bias))
    x = torch.randn(2, WIDTH, *size)
    with torch.no_grad():
        expected = _nchw_to_nhwc(reference(x))  # [B, ceil(H/2), ceil(W/2), C]
    params = convert.downsample_from_torch(_state_dict(reference))
    ours = uvit.Downsample(use_bias=bias).apply({"params": params}, _nchw_to_nhwc(x))
    assert relative_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("bias", [False, True])
def test_upsample_matches_diffusers(bias):
    reference = _randomize(_torch_upsample(WIDTH, bias))
    x = torch.randn(2, WIDTH, 4, 3)
    with torch.no_grad():
        expected = _nchw_to_nhwc(reference(x))  # [B, 2H, 2W, C]
    params = convert.upsample_from_torch(_state_dict(reference))
    assert params["kernel"].shape == (WIDTH, 2, 2, WIDTH)
    ours = uvit.Upsample(use_bias=bias).apply({"params": params}, _nchw_to_nhwc(x))
    assert relative_error(ours, expected) <= TOLERANCE


def test_converted_trees_match_our_init_structure():
    """Converted trees have exactly the names and shapes `init` creates (so they drop into a full model)."""
    modules = {
        "embed": (
            UVit2DConvEmbed(EMBED, WIDTH, VOCAB, elementwise_affine=True, eps=EPS, bias=False),
            convert.conv_embed_from_torch,
            uvit.ConvEmbed(VOCAB, EMBED, WIDTH),
            np.zeros((1, 4, 4), np.int32),
        ),
        "mlm": (
            TorchConvMlmLayer(WIDTH, EMBED, False, True, EPS, CODEBOOK),
            convert.conv_mlm_layer_from_torch,
            uvit.ConvMlmLayer(EMBED, CODEBOOK),
            np.zeros((1, 4, 4, WIDTH), np.float32),
        ),
        "down": (
            _torch_downsample(WIDTH, False),
            convert.downsample_from_torch,
            uvit.Downsample(),
            np.zeros((1, 4, 4, WIDTH), np.float32),
        ),
        "up": (
            _torch_upsample(WIDTH, False),
            convert.upsample_from_torch,
            uvit.Upsample(),
            np.zeros((1, 4, 4, WIDTH), np.float32),
        ),
    }
    for name, (reference, converter, ours, sample) in modules.items():
        expected = jax.eval_shape(lambda m=ours, s=sample: nn.meta.unbox(m.init(jax.random.key(0), s)))["params"]
        check_tree(converter(_state_dict(reference)), expected, name)


def test_non_affine_norm_converts_to_unit_scale():
    reference = _randomize(UVit2DConvEmbed(EMBED, WIDTH, VOCAB, elementwise_affine=False, eps=EPS, bias=False))
    ids = torch.randint(0, VOCAB, (1, 3, 3))
    with torch.no_grad():
        expected = _nchw_to_nhwc(reference(ids))
    params = convert.conv_embed_from_torch(_state_dict(reference))
    np.testing.assert_array_equal(params["layer_norm"]["scale"], np.ones(EMBED, np.float32))
    ours = uvit.ConvEmbed(VOCAB, EMBED, WIDTH).apply({"params": params}, ids.numpy())
    assert relative_error(ours, expected) <= TOLERANCE


def test_mgt_helper_reads_meissonic_layout_and_remaps_the_mask_row():
    """A Meissonic-style state dict: vocab_size = codebook + 8 rows, mask token at vocab_size - 1."""
    vocab = CODEBOOK + 8
    parts = {
        "embed": _randomize(UVit2DConvEmbed(WIDTH, WIDTH, vocab, elementwise_affine=True, eps=EPS, bias=False)),
        "mlm_layer": _randomize(TorchConvMlmLayer(WIDTH, WIDTH, False, True, EPS, CODEBOOK)),
        "down_block.downsample": _randomize(_torch_downsample(WIDTH, False)),
        "up_block.upsample": _randomize(_torch_upsample(WIDTH, False)),
    }
    state_dict = {
        f"transformer.{part}.{key}": value for part, m in parts.items() for key, value in _state_dict(m).items()
    }
    state_dict["transformer.proj_out.weight"] = np.zeros((3, 3), np.float32)  # unrelated keys are ignored

    tree = convert.mgt_embed_and_head_from_torch(state_dict, "transformer", codebook_size=CODEBOOK)
    assert set(tree) == {"embed", "mlm_layer", "down_block", "up_block"}
    table = _state_dict(parts["embed"])["embeddings.weight"]
    np.testing.assert_array_equal(tree["embed"]["embeddings"]["embedding"][:CODEBOOK], table[:CODEBOOK])
    np.testing.assert_array_equal(tree["embed"]["embeddings"]["embedding"][CODEBOOK], table[vocab - 1])

    # Our mask id (CODEBOOK) embeds exactly like Meissonic's mask id (vocab - 1).
    ids = torch.randint(0, CODEBOOK, (1, 4, 4))
    ids[0, 1, 2] = vocab - 1
    with torch.no_grad():
        expected = _nchw_to_nhwc(parts["embed"](ids))
    ours_ids = np.where(ids.numpy() == vocab - 1, CODEBOOK, ids.numpy())
    ours = uvit.ConvEmbed(CODEBOOK + 1, WIDTH, WIDTH).apply({"params": tree["embed"]}, ours_ids)
    assert relative_error(ours, expected) <= TOLERANCE

    # The subtrees drop into our MGT: same names and shapes as its init.
    mgt = MaskedGenerativeTransformer(
        codebook_size=CODEBOOK, num_layers=1, num_single_layers=1, num_heads=2, head_dim=WIDTH // 2,
        embed_dim=WIDTH, downsample=True, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    inputs = (np.zeros((1, 4, 4), np.int32), np.zeros((1, 3, 8), np.float32), np.ones((1, 3), bool),
              np.zeros((1, 8), np.float32), np.zeros((1,), np.float32), np.zeros((1, 5), np.float32))  # fmt: skip
    expected = jax.eval_shape(lambda: nn.meta.unbox(mgt.init(jax.random.key(0), *inputs)))["params"]
    for name, subtree in tree.items():
        check_tree(subtree, expected[name], name)

    with pytest.raises(ValueError, match="predicts"):
        convert.mgt_embed_and_head_from_torch(state_dict, "transformer.", codebook_size=CODEBOOK + 1)
    no_blocks = {k: v for k, v in state_dict.items() if "_block." not in k}
    assert set(convert.mgt_embed_and_head_from_torch(no_blocks, "transformer.")) == {"embed", "mlm_layer"}


def test_converters_reject_bad_state_dicts():
    sd = _state_dict(_torch_downsample(WIDTH, False))
    with pytest.raises(ValueError, match="unexpected"):
        convert.downsample_from_torch({**sd, "extra.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="missing 'conv.weight'"):
        convert.upsample_from_torch({"norm.weight": sd["norm.weight"]})
    with pytest.raises(ValueError, match="norm.weight"):
        convert.downsample_from_torch({**sd, "norm.weight": np.ones(WIDTH + 1, np.float32)})
    with pytest.raises(ValueError, match="1x1"):
        convert.conv_mlm_layer_from_torch(
            {"conv1.weight": np.zeros((4, 4, 3, 3)), "conv2.weight": np.zeros((5, 4, 1, 1))}
        )
