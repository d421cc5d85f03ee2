"""Numerical parity of the Flux-style blocks with diffusers, and the generator-agnostic block features.

Tiny random diffusers `FluxTransformerBlock` / `FluxSingleTransformerBlock` (float32, fixed seed, every parameter
re-drawn so no weight is trivial) are run next to our `DoubleStreamBlock` / `SingleStreamBlock` with converted weights.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from diffusers.models.transformers.transformer_flux import (  # noqa: E402
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from editing_jax.convert.flux_blocks import load_safetensors_block, torch_state_dict_to_flax  # noqa: E402
from editing_jax.nn.attention import apply_rope, rope_frequencies  # noqa: E402
from editing_jax.nn.transformer import DoubleStreamBlock, SingleStreamBlock  # noqa: E402
from tests.helpers.parity import relative_error  # noqa: E402

DIM, HEADS, HEAD_DIM = 64, 4, 16
AXES_DIMS = (4, 6, 6)
BATCH, TEXT_LEN, IMAGE_LEN, COND_LEN = 2, 5, 12, 6
BLOCKS = {"double": DoubleStreamBlock, "single": SingleStreamBlock}


def _randomize(module):
    """Re-draws every parameter: RMSNorm scales around 1, everything else N(0, 0.1^2)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm_" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return module.eval()


def _merge(initialized, pretrained):
    """Overwrites the leaves of `initialized` that `pretrained` has (e.g. base weights into a LoRA model)."""
    out = dict(initialized)
    for key, value in pretrained.items():
        out[key] = _merge(initialized[key], value) if isinstance(value, dict) else jnp.asarray(value)
    return out


@pytest.fixture(scope="module")
def world():
    """Torch blocks, their converted params, inputs and RoPE tables for [text; image] and [text; image; cond]."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    torch_blocks = {
        "double": _randomize(FluxTransformerBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)),
        "single": _randomize(
            FluxSingleTransformerBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
        ),
    }
    params = {
        kind: torch_state_dict_to_flax({k: v.numpy() for k, v in block.state_dict().items()}, kind)
        for kind, block in torch_blocks.items()
    }
    ids = rng.integers(0, 32, size=(TEXT_LEN + IMAGE_LEN + COND_LEN, 3))
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(
        torch_blocks=torch_blocks,
        params=params,
        ids=ids,
        image=f32(BATCH, IMAGE_LEN, DIM),
        text=f32(BATCH, TEXT_LEN, DIM),
        cond=f32(BATCH, COND_LEN, DIM),
        temb=f32(BATCH, DIM),
        cond_temb=f32(BATCH, DIM),
        rope=rope_frequencies(ids[: TEXT_LEN + IMAGE_LEN], AXES_DIMS, 10000),
        rope_cond=rope_frequencies(ids, AXES_DIMS, 10000),
    )


def _apply(kind, params, world, *, cond=None, cond_temb=None, rope=None, **kwargs):
    block = BLOCKS[kind](HEADS, HEAD_DIM)
    if rope is None:
        rope = world["rope"] if cond is None else world["rope_cond"]
    return block.apply(
        {"params": params},
        world["image"],
        world["text"],
        world["temb"],
        rope,
        cond_hidden=cond,
        cond_temb=cond_temb,
        **kwargs,
    )


def test_rope_matches_flux_pos_embed(world):
    ids = world["ids"]
    cos_ref, sin_ref = (t.numpy() for t in FluxPosEmbed(theta=10000, axes_dim=list(AXES_DIMS))(torch.from_numpy(ids)))
    cos, sin = rope_frequencies(ids, AXES_DIMS, 10000)  # host path: float64 angles like diffusers
    np.testing.assert_array_equal(cos, cos_ref)
    np.testing.assert_array_equal(sin, sin_ref)
    cos_traced, sin_traced = jax.jit(lambda p: rope_frequencies(p, AXES_DIMS, 10000))(jnp.asarray(ids))
    assert np.abs(np.asarray(cos_traced) - cos_ref).max() < 1e-6
    assert np.abs(np.asarray(sin_traced) - sin_ref).max() < 1e-6
    batched_cos, _ = rope_frequencies(np.stack([ids, ids]), AXES_DIMS, 10000)  # [B, L, Dh]
    np.testing.assert_array_equal(batched_cos[1], cos_ref)

    x = np.random.default_rng(1).standard_normal((BATCH, len(ids), HEADS, HEAD_DIM)).astype(np.float32)
    reference = apply_rotary_emb(torch.from_numpy(x), (torch.from_numpy(cos), torch.from_numpy(sin)), sequence_dim=1)
    assert relative_error(apply_rope(jnp.asarray(x), cos, sin), reference.numpy()) <= 1e-6


def test_double_block_matches_diffusers(world):
    cos, sin = (torch.from_numpy(t) for t in world["rope"])
    with torch.no_grad():
        text_ref, image_ref = world["torch_blocks"]["double"](
            torch.from_numpy(world["image"]),
            torch.from_numpy(world["text"]),
            torch.from_numpy(world["temb"]),
            image_rotary_emb=(cos, sin),
        )
    image, text, cond = _apply("double", world["params"]["double"], world)
    assert cond is None
    assert image.shape == (BATCH, IMAGE_LEN, DIM) and text.shape == (BATCH, TEXT_LEN, DIM)
    assert relative_error(image, image_ref.numpy()) <= 1e-5
    assert relative_error(text, text_ref.numpy()) <= 1e-5


def test_single_block_matches_diffusers(world):
    cos, sin = (torch.from_numpy(t) for t in world["rope"])
    with torch.no_grad():
        text_ref, image_ref = world["torch_blocks"]["single"](
            torch.from_numpy(world["image"]),
            torch.from_numpy(world["text"]),
            torch.from_numpy(world["temb"]),
            image_rotary_emb=(cos, sin),
        )
    image, text, _ = _apply("single", world["params"]["single"], world)
    assert relative_error(image, image_ref.numpy()) <= 1e-5
    assert relative_error(text, text_ref.numpy()) <= 1e-5


@pytest.mark.parametrize("kind", ["double", "single"])
def test_converted_tree_matches_init_and_is_partitioned(world, kind):
    block = BLOCKS[kind](HEADS, HEAD_DIM)
    abstract = jax.eval_shape(
        lambda: block.init(jax.random.key(0), world["image"], world["text"], world["temb"], world["rope"])
    )
    shapes = jax.tree.map(lambda x: x.shape, flax.linen.unbox(abstract["params"]))
    assert shapes == jax.tree.map(np.shape, world["params"][kind])
    specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(abstract)["params"])
    assert all(spec is not None and len(spec) > 0 for spec in specs.values())
    attn_kernel = ("attn", "to_q", "kernel")
    assert tuple(specs[attn_kernel]) == ("embed", "heads")


def test_lora_with_zero_b_equals_base_and_trains(world):
    targets = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "to_add_out", "proj", "net_2")
    block = DoubleStreamBlock(HEADS, HEAD_DIM, lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    init = block.init(jax.random.key(0), world["image"], world["text"], world["temb"], world["rope"])
    params = _merge(flax.linen.unbox(init["params"]), world["params"]["double"])
    assert params["attn"]["to_q"]["lora_a"].shape == (DIM, 4)
    assert params["ff"]["net_0"]["proj"]["lora_b"].shape == (4, 4 * DIM)
    assert "lora_a" not in params["attn"]["add_k_proj"]
    base_image, base_text, _ = _apply("double", world["params"]["double"], world)
    args = (world["image"], world["text"], world["temb"], world["rope"])
    image, text, _ = block.apply({"params": params}, *args)
    np.testing.assert_allclose(image, base_image, rtol=0, atol=1e-6)
    np.testing.assert_allclose(text, base_text, rtol=0, atol=1e-6)
    # A non-zero B must change the output (the adapter is wired in).
    params["attn"]["to_q"]["lora_b"] = jnp.full((4, DIM), 0.1)
    image, _, _ = block.apply({"params": params}, *args)
    assert np.abs(image - base_image).max() > 1e-3


@pytest.mark.parametrize("kind", ["double", "single"])
def test_attention_bias(world, kind):
    params = world["params"][kind]
    total = TEXT_LEN + IMAGE_LEN + COND_LEN
    image, text, cond = _apply(kind, params, world, cond=world["cond"], cond_temb=world["cond_temb"])
    zero = jnp.zeros((1, 1, total, total))
    image0, text0, cond0 = _apply(
        kind, params, world, cond=world["cond"], cond_temb=world["cond_temb"], attention_bias=zero
    )
    for ours, ref in ((image0, image), (text0, text), (cond0, cond)):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)

    # -inf from image queries to cond keys: the image output no longer depends on the cond tokens.
    blocked = np.zeros((1, 1, total, total), np.float32)
    blocked[:, :, TEXT_LEN : TEXT_LEN + IMAGE_LEN, TEXT_LEN + IMAGE_LEN :] = -np.inf
    other_cond = world["cond"] + 3.0 * np.random.default_rng(2).standard_normal(world["cond"].shape).astype(np.float32)
    runs = [
        _apply(kind, params, world, cond=c, cond_temb=world["cond_temb"], attention_bias=jnp.asarray(blocked))
        for c in (world["cond"], other_cond)
    ]
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=0, atol=1e-6)
    assert np.abs(runs[0][1] - runs[1][1]).max() > 1e-3  # text still attends to the cond tokens
    # Without the bias the cond tokens do influence the image tokens.
    free = _apply(kind, params, world, cond=other_cond, cond_temb=world["cond_temb"])
    assert np.abs(free[0] - image).max() > 1e-3


@pytest.mark.parametrize("kind", ["double", "single"])
def test_cond_tokens_with_image_temb_act_as_extra_image_tokens(world, kind):
    params = world["params"][kind]
    image, text, cond = _apply(kind, params, world, cond=world["cond"], cond_temb=world["temb"])
    block = BLOCKS[kind](HEADS, HEAD_DIM)
    joint_image = np.concatenate([world["image"], world["cond"]], axis=1)  # [B, Li + Lc, D]
    ref_image, ref_text, _ = block.apply(
        {"params": params}, joint_image, world["text"], world["temb"], world["rope_cond"]
    )
    np.testing.assert_allclose(image, ref_image[:, :IMAGE_LEN], rtol=0, atol=1e-5)
    np.testing.assert_allclose(cond, ref_image[:, IMAGE_LEN:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(text, ref_text, rtol=0, atol=1e-5)
    # A different cond timestep embedding changes the cond tokens' modulation.
    _, _, cond_other = _apply(kind, params, world, cond=world["cond"], cond_temb=world["cond_temb"])
    assert np.abs(cond_other - cond).max() > 1e-3


@pytest.mark.parametrize("kind", ["double", "single"])
def test_capture_attention(world, kind):
    params = world["params"][kind]
    (image, _, _), state = _apply(
        kind, params, world, cond=world["cond"], cond_temb=world["cond_temb"], mutable=["intermediates"]
    )
    assert state == {}  # free when off: nothing is sown
    (image_c, _, _), state = _apply(
        kind,
        params,
        world,
        cond=world["cond"],
        cond_temb=world["cond_temb"],
        capture_attention=True,
        mutable=["intermediates"],
    )
    (probs,) = state["intermediates"]["attn"]["attention_probs"]
    total = TEXT_LEN + IMAGE_LEN + COND_LEN
    assert probs.shape == (BATCH, HEADS, total, total) and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0
    np.testing.assert_allclose(image_c, image, rtol=0, atol=1e-6)


def test_jit_matches_eager(world):
    params = world["params"]["double"]
    block = DoubleStreamBlock(HEADS, HEAD_DIM)

    @jax.jit
    def run(params, image, text, temb, cond, cond_temb):
        return block.apply(
            {"params": params}, image, text, temb, world["rope_cond"], cond_hidden=cond, cond_temb=cond_temb
        )

    args = (world["image"], world["text"], world["temb"], world["cond"], world["cond_temb"])
    jitted = run(params, *args)
    eager = _apply("double", params, world, cond=world["cond"], cond_temb=world["cond_temb"])
    for ours, ref in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_converter_errors_name_the_parameter(world):
    state = {k: v.numpy() for k, v in world["torch_blocks"]["double"].state_dict().items()}
    bad = dict(state)
    bad["attn.to_k.weight"] = np.zeros((DIM, DIM + 1), np.float32)
    with pytest.raises(ValueError, match="attn.to_k.weight"):
        torch_state_dict_to_flax(bad, "double")
    missing = {k: v for k, v in state.items() if k != "attn.norm_added_k.weight"}
    with pytest.raises(ValueError, match="attn.norm_added_k.weight"):
        torch_state_dict_to_flax(missing, "double")
    with pytest.raises(ValueError, match="unexpected keys.*proj_mlp"):
        torch_state_dict_to_flax({**state, "proj_mlp.weight": np.zeros((1, 1))}, "double")
    with pytest.raises(ValueError, match="kind"):
        torch_state_dict_to_flax(state, "triple")


def test_load_safetensors_block(world, tmp_path):
    from safetensors.torch import save_file

    block = world["torch_blocks"]["single"]
    tensors = {f"single_transformer_blocks.3.{k}": v.contiguous() for k, v in block.state_dict().items()}
    tensors["single_transformer_blocks.30.proj_out.bias"] = torch.zeros(DIM)  # a neighbour sharing the prefix text
    path = tmp_path / "transformer.safetensors"
    save_file(tensors, str(path))
    loaded = load_safetensors_block(path, "single_transformer_blocks.3", "single")
    jax.tree.map(np.testing.assert_array_equal, loaded, world["params"]["single"])

    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))
    loaded = load_safetensors_block(path, "single_transformer_blocks.3.", "single", dtype=np.float32)
    assert loaded["proj_out"]["kernel"].dtype == np.float32
    np.testing.assert_allclose(loaded["proj_out"]["kernel"], world["params"]["single"]["proj_out"]["kernel"], atol=2e-3)
    with pytest.raises(KeyError, match="prefix"):
        load_safetensors_block(path, "transformer_blocks.0.", "double")
