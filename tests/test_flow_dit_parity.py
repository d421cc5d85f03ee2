"""Numerical parity of `FlowDiT` with diffusers' `FluxTransformer2DModel`, plus packing, LoRA and the converter.

Tiny random diffusers models (float32, fixed seed, every parameter re-drawn, including the zero-initialized ones) are
run next to `FlowDiT` with converted weights, with and without the guidance embedding and with Kontext reference
tokens concatenated after the target tokens.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

from editing_jax.convert import flux_transformer  # noqa: E402
from editing_jax.models.flow_dit import (  # noqa: E402
    FlowDiT,
    captured_attention,
    latent_image_ids,
    lora_param_mask,
    merge_lora,
    pack_latents,
    strip_lora,
    unpack_latents,
    zero_lora,
)
from tests.helpers.parity import relative_error  # noqa: E402

HEADS, HEAD_DIM, AXES_DIMS = 2, 16, (4, 6, 6)
LATENT_CHANNELS, IN_CHANNELS, TEXT_DIM, POOLED_DIM = 4, 16, 32, 16
BATCH, TEXT_LEN, LATENT_SIZE, REF_SIZE = 2, 5, 8, 6  # latent grids 8x8 (target) and 6x6 (reference)
TORCH_CONFIG = dict(
    patch_size=1,
    in_channels=IN_CHANNELS,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=HEAD_DIM,
    num_attention_heads=HEADS,
    joint_attention_dim=TEXT_DIM,
    pooled_projection_dim=POOLED_DIM,
    axes_dims_rope=AXES_DIMS,
)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "to_add_out", "proj", "net_2", "proj_mlp")


def _randomize(module):
    """Re-draws every parameter: qk-RMSNorm scales around 1, everything else N(0, 0.1^2)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and ".norm_" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return module.eval()


def _state_dict(module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in module.state_dict().items()}


def _nchw(x):
    batch, height, width, channels = x.shape
    return batch, channels, height, width


def _inputs(world):
    """Positional FlowDiT inputs (no guidance, no reference), for eager calls."""
    return (
        pack_latents(world["latents"]),
        world["text"],
        world["pooled"],
        world["timestep"],
        world["img_ids"],
        world["txt_ids"],
    )


def _model(guidance: bool, **kwargs) -> FlowDiT:
    return FlowDiT(**flux_transformer.flow_dit_kwargs({**TORCH_CONFIG, "guidance_embeds": guidance}), **kwargs)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    torch_models = {g: _randomize(FluxTransformer2DModel(**TORCH_CONFIG, guidance_embeds=g)) for g in (False, True)}
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    grid, ref_grid = LATENT_SIZE // 2, REF_SIZE // 2
    img_ids, ref_ids = latent_image_ids(grid, grid), latent_image_ids(ref_grid, ref_grid, index=1)
    txt_ids = np.zeros((TEXT_LEN, 3), np.float32)
    return dict(
        forward=_make_forward(img_ids, txt_ids, ref_ids),
        torch_models=torch_models,
        params={g: flux_transformer.torch_state_dict_to_flax(_state_dict(m)) for g, m in torch_models.items()},
        latents=f32(BATCH, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS),
        ref_latents=f32(BATCH, REF_SIZE, REF_SIZE, LATENT_CHANNELS),
        text=f32(BATCH, TEXT_LEN, TEXT_DIM),
        pooled=f32(BATCH, POOLED_DIM),
        timestep=np.array([0.3, 0.85], np.float32),
        guidance=np.array([3.5, 2.0], np.float32),
        img_ids=img_ids,
        ref_ids=ref_ids,
        txt_ids=txt_ids,
    )


def _forward(model, params, world, *, guidance, ref=False):
    """Jitted FlowDiT forward; compiled once per (model, guidance, ref) for the whole module."""
    g = world["guidance"] if guidance else None
    args = (world["latents"], world["text"], world["pooled"], world["timestep"], g, world["ref_latents"])
    return world["forward"](model, params, *args, with_ref=ref)


def _make_forward(img_ids, txt_ids, ref_ids):
    """The position ids are closed over (NumPy), so RoPE takes the exact host path like diffusers."""

    @functools.partial(jax.jit, static_argnames=("model", "with_ref"))
    def forward(model, params, latents, text, pooled, timestep, guidance, ref_latents, with_ref):
        return model.apply(
            {"params": params},
            pack_latents(latents),
            text,
            pooled,
            timestep,
            img_ids,
            txt_ids,
            guidance,
            ref_hidden=pack_latents(ref_latents) if with_ref else None,
            ref_ids=ref_ids if with_ref else None,
        )

    return forward


def _torch_forward(world, *, guidance, ref=False):
    pack = lambda x: FluxPipeline._pack_latents(torch.from_numpy(x).permute(0, 3, 1, 2), *_nchw(x))  # noqa: E731
    hidden, img_ids = pack(world["latents"]), torch.from_numpy(world["img_ids"])
    if ref:
        hidden = torch.cat([hidden, pack(world["ref_latents"])], dim=1)
        img_ids = torch.cat([img_ids, torch.from_numpy(world["ref_ids"])], dim=0)
    with torch.no_grad():
        out = world["torch_models"][guidance](
            hidden_states=hidden,
            encoder_hidden_states=torch.from_numpy(world["text"]),
            pooled_projections=torch.from_numpy(world["pooled"]),
            timestep=torch.from_numpy(world["timestep"]),
            img_ids=img_ids,
            txt_ids=torch.from_numpy(world["txt_ids"]),
            guidance=torch.from_numpy(world["guidance"]) if guidance else None,
            return_dict=False,
        )[0]
    return out[:, : (LATENT_SIZE // 2) ** 2].numpy()  # Kontext drops the reference outputs


def test_pack_unpack_and_ids_match_diffusers(world):
    latents = world["latents"]
    packed = pack_latents(jnp.asarray(latents))
    reference = FluxPipeline._pack_latents(torch.from_numpy(latents).permute(0, 3, 1, 2), *_nchw(latents))
    np.testing.assert_array_equal(packed, reference.numpy())
    assert packed.shape == (BATCH, (LATENT_SIZE // 2) ** 2, 4 * LATENT_CHANNELS)
    np.testing.assert_array_equal(unpack_latents(packed, LATENT_SIZE, LATENT_SIZE), latents)
    vae_scale = 8  # diffusers' unpack takes pixel sizes
    unpacked = FluxPipeline._unpack_latents(reference, LATENT_SIZE * vae_scale, LATENT_SIZE * vae_scale, vae_scale)
    np.testing.assert_array_equal(unpacked.permute(0, 2, 3, 1).numpy(), latents)
    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(3, 5), ids)
    ids[:, 0] = 1  # FluxKontextPipeline's reference ids
    np.testing.assert_array_equal(latent_image_ids(3, 5, index=1), ids)
    with pytest.raises(ValueError, match="divisible"):
        pack_latents(jnp.zeros((1, 5, 4, 2)))
    with pytest.raises(ValueError, match="unpack"):
        unpack_latents(packed, LATENT_SIZE, LATENT_SIZE + 2)


# Each case compiles the model once (the cost of this file); guidance x reference has no interaction to cover.
@pytest.mark.parametrize(
    "guidance, ref", [(False, False), (False, True), (True, True)], ids=["t2i", "kontext", "kontext_guidance"]
)
def test_matches_diffusers(world, guidance, ref):
    reference = _torch_forward(world, guidance=guidance, ref=ref)
    ours = _forward(_model(guidance), world["params"][guidance], world, guidance=guidance, ref=ref)
    assert ours.shape == reference.shape == (BATCH, (LATENT_SIZE // 2) ** 2, IN_CHANNELS)
    error = relative_error(ours, reference)
    assert error <= 1e-5, error


def test_reference_tokens_condition_the_output(world):
    model, params = _model(False), world["params"][False]
    plain = _forward(model, params, world, guidance=False)
    with_ref = _forward(model, params, world, guidance=False, ref=True)
    assert np.abs(with_ref - plain).max() > 1e-3
    with pytest.raises(ValueError, match="together"):
        model.apply({"params": params}, *_inputs(world), ref_hidden=pack_latents(world["ref_latents"]))
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        model.apply({"params": params}, *_inputs(world), world["guidance"])


def test_converted_tree_matches_init_and_is_partitioned(world):
    model = _model(True)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(world), world["guidance"]))
    shapes = jax.tree.map(lambda x: x.shape, flax.linen.unbox(abstract["params"]))
    assert shapes == jax.tree.map(np.shape, world["params"][True])
    specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(abstract)["params"])
    assert all(spec is not None and len(spec) > 0 for spec in specs.values())
    assert tuple(specs[("x_embedder", "kernel")]) == (None, "embed")
    assert tuple(specs[("norm_out", "linear", "kernel")]) == ("embed", "mlp")
    assert tuple(specs[("single_transformer_blocks_1", "attn", "to_q", "kernel")]) == ("embed", "heads")


def test_fresh_model_predicts_zero_velocity(world):
    model = FlowDiT(num_layers=0, num_single_layers=0, num_heads=HEADS, head_dim=HEAD_DIM, axes_dims_rope=AXES_DIMS)
    velocity = jax.jit(lambda rng: model.apply(model.init(rng, *_inputs(world)), *_inputs(world)))(jax.random.key(0))
    assert velocity.shape == (BATCH, (LATENT_SIZE // 2) ** 2, IN_CHANNELS)
    np.testing.assert_array_equal(velocity, 0.0)


def test_lora_merge_zero_and_mask(world):
    base = world["params"][False]
    model = _model(False, lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)
    init = jax.eval_shape(lambda: flax.linen.unbox(model.init(jax.random.key(0), *_inputs(world))["params"]))
    mask = flax.traverse_util.flatten_dict(lora_param_mask(init))
    abstract_leaves = flax.traverse_util.flatten_dict(init)
    lora_paths = [path for path, selected in mask.items() if selected]
    assert lora_paths and all(path[-1] in ("lora_a", "lora_b") for path in lora_paths)
    assert not any(path[-1] in ("lora_a", "lora_b") for path, selected in mask.items() if not selected)
    assert ("single_transformer_blocks_0", "proj_mlp", "lora_b") in mask
    assert ("transformer_blocks_0", "attn", "add_k_proj", "lora_a") not in mask

    # Base weights from the converted model, adapters random (a trained adapter).
    rng = np.random.default_rng(5)
    flat = flax.traverse_util.flatten_dict(base)
    for path in lora_paths:
        flat[path] = jnp.asarray(0.1 * rng.standard_normal(abstract_leaves[path].shape), jnp.float32)
    params = flax.traverse_util.unflatten_dict(flat)
    jax.tree.map(np.testing.assert_array_equal, strip_lora(params), base)

    adapted = _forward(model, params, world, guidance=False, ref=True)
    plain_model = _model(False)
    base_out = _forward(plain_model, base, world, guidance=False, ref=True)
    assert np.abs(adapted - base_out).max() > 1e-2  # the adapters are wired in
    merged = merge_lora(params, lora_alpha=8.0, lora_rank=4)
    assert jax.tree.map(np.shape, merged) == jax.tree.map(np.shape, base)
    merged_out = _forward(plain_model, merged, world, guidance=False, ref=True)
    assert relative_error(merged_out, adapted) <= 1e-5
    disabled = _forward(model, zero_lora(params), world, guidance=False, ref=True)
    np.testing.assert_allclose(disabled, base_out, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="lora_rank"):
        merge_lora(params, 8.0, 0)


def test_capture_layers(world):
    model, params = _model(False), world["params"][False]
    apply = jax.jit(
        lambda params: model.apply(
            {"params": params},
            *_inputs(world),
            ref_hidden=pack_latents(world["ref_latents"]),
            ref_ids=world["ref_ids"],
            capture_layers=(1, 3),
            mutable=["intermediates"],
        )
    )
    out, state = apply(params)
    np.testing.assert_allclose(out, _forward(model, params, world, guidance=False, ref=True), rtol=0, atol=1e-6)
    probs = captured_attention(model, state["intermediates"], (1, 3))
    total = TEXT_LEN + (LATENT_SIZE // 2) ** 2 + (REF_SIZE // 2) ** 2
    assert probs.shape == (2, BATCH, HEADS, total, total)
    assert set(state["intermediates"]) == {"transformer_blocks_1", "single_transformer_blocks_1"}
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_converter_errors_name_the_parameter(world):
    state = _state_dict(world["torch_models"][True])
    bad = dict(state)
    bad["proj_out.weight"] = np.zeros((IN_CHANNELS, 7), np.float32)
    with pytest.raises(ValueError, match="proj_out.weight"):
        flux_transformer.torch_state_dict_to_flax(bad)
    missing = {k: v for k, v in state.items() if k != "time_text_embed.guidance_embedder.linear_2.bias"}
    with pytest.raises(ValueError, match="guidance_embedder.linear_2.bias"):
        flux_transformer.torch_state_dict_to_flax(missing)
    block_bad = {k: v for k, v in state.items() if k != "single_transformer_blocks.1.attn.norm_k.weight"}
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.1.*attn\.norm_k\.weight"):
        flux_transformer.torch_state_dict_to_flax(block_bad)
    gap = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.0.")}
    with pytest.raises(ValueError, match="indices"):
        flux_transformer.torch_state_dict_to_flax(gap)
    with pytest.raises(ValueError, match="unexpected keys.*pos_embed"):
        flux_transformer.torch_state_dict_to_flax({**state, "pos_embed.freqs": np.zeros(3)})


def test_load_safetensors_file_and_shards(world, tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in world["torch_models"][True].state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = flux_transformer.load_safetensors(tmp_path / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, loaded, world["params"][True])

    shards = tmp_path / "transformer"
    shards.mkdir()
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[::2]}, str(shards / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file(
        {k: tensors[k].to(torch.bfloat16) for k in keys[1::2]},
        str(shards / "diffusion_pytorch_model-00002-of-00002.safetensors"),
    )
    loaded = flux_transformer.load_safetensors(shards, dtype=np.float32)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), loaded, world["params"][True])

    save_file({keys[0]: tensors[keys[0]]}, str(shards / "extra.safetensors"))
    with pytest.raises(ValueError, match="more than one shard"):
        flux_transformer.load_safetensors(shards)
    with pytest.raises(FileNotFoundError):
        flux_transformer.load_safetensors(tmp_path / "missing")

    config_path = tmp_path / "config.json"
    world["torch_models"][True].save_config(tmp_path)
    kwargs = flux_transformer.flow_dit_kwargs(config_path)
    assert kwargs == dict(
        num_layers=2,
        num_single_layers=2,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        axes_dims_rope=AXES_DIMS,
        out_channels=IN_CHANNELS,
        guidance_embeds=True,
    )
