"""Tests for the flow editor (CogniEdit's SFT base): flow-matching loss, the one-jit edit, config plumbing, CLI run."""

import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from editing_jax import cli
from editing_jax.methods import editmgt, flow_edit
from editing_jax.models.autoencoder import AutoencoderKL
from editing_jax.models.flow_dit import FlowDiT, unpack_latents
from editing_jax.sampling import flow
from editing_jax.text.encoder import TextEncoder
from editing_jax.text.tokenizer import WordTokenizer

VOCAB = ("make", "the", "red", "blue", "circle", "a")


@pytest.fixture(scope="module")
def tiny_flow():
    autoencoder = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                use_mid_block=False, latent_channels=4)  # fmt: skip
    tokenizer = WordTokenizer(VOCAB, max_length=6, num_hash_buckets=4)
    text_encoder = TextEncoder(tokenizer.vocab_size, width=16, num_layers=1, num_heads=2, max_length=6, pooled_dim=8)
    dit = FlowDiT(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                  zero_init_modulation=False, zero_init_output=False)  # fmt: skip
    model = flow_edit.FlowEditor(dit, text_encoder, autoencoder, tokenizer, image_size=8, patch_size=2)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    tokenizer_variables = autoencoder.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
    settings = flow_edit.FlowSettings(num_steps=3)
    objective = flow_edit.make_objective(model, tokenizer_variables, cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=settings)  # fmt: skip
    batch = model.prepare_batch({
        "source_image": images,
        "target_image": images[::-1].copy(),
        "instruction": np.asarray(["make the red circle blue", "make a circle"], object),
    })  # fmt: skip
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object}
    variables = nn.meta.unbox(jax.jit(objective.init)(jax.random.key(2), arrays))
    return model, objective, variables, batch, arrays


def test_latent_stats_normalize_the_first_batch_and_round_trip(tiny_flow):
    model, _, variables, _, arrays = tiny_flow
    state = {k: v for k, v in variables.items() if k != "params"}
    both = jnp.concatenate([arrays["source_image"], arrays["target_image"]])
    packed = model.encode(state, both)  # [4, L, C]
    assert packed.shape == (4, model.token_grid**2, 4 * 4)
    np.testing.assert_allclose(float(jnp.mean(packed)), 0.0, atol=1e-5)
    np.testing.assert_allclose(float(jnp.std(packed)), 1.0, rtol=1e-4)
    # decode(encode(x)) decodes exactly the (denormalized) posterior means.
    raw = model.raw_latents(state, both)
    expected = AutoencoderKL.decode
    direct = model.autoencoder.apply(state["tokenizer"], raw, method=expected)
    np.testing.assert_array_equal(np.asarray(model.decode(state, packed)),
                                  np.asarray(jnp.round((jnp.clip(direct, -1, 1) + 1) * 127.5)).astype(np.uint8))  # fmt: skip


def test_loss_regresses_the_rectified_flow_velocity(tiny_flow):
    model, objective, variables, _, arrays = tiny_flow
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    rng = jax.random.key(5)
    loss, _ = jax.jit(objective.loss)(params, state, arrays, rng)
    # Recompute by hand with the loss's rng splits: x_t = (1 - t) x_0 + t eps, target eps - x_0.
    time_rng, noise_rng, _ = jax.random.split(rng, 3)
    x0 = model.encode(state, arrays["target_image"])
    t = jax.random.uniform(time_rng, (2,), minval=1e-3, maxval=1 - 1e-3)
    eps = jax.random.normal(noise_rng, x0.shape)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    text = model.encode_text(params, arrays["text_ids"], arrays["text_mask"])
    v = model.velocity(params, x_t, t, text, model.encode(state, arrays["source_image"]))
    np.testing.assert_allclose(float(loss), float(jnp.mean((v - (eps - x0)) ** 2)), rtol=1e-5)


def test_few_steps_reduce_the_loss(tiny_flow):
    _, objective, variables, _, arrays = tiny_flow
    state = {k: v for k, v in variables.items() if k != "params"}
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, state, arrays, jax.random.key(0))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = variables["params"], optimizer.init(variables["params"])
    losses = [float(step(params, opt_state)[2])]
    for _ in range(25):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_edit_is_the_ode_sample_and_guidance_one_is_no_guidance(tiny_flow):
    model, _, variables, batch, _ = tiny_flow
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    settings = flow_edit.FlowSettings(num_steps=3)
    edit_fn = flow_edit.make_edit_fn(model, settings)
    out = editmgt.run_edits(edit_fn, params, state, batch, settings, seed=3)
    assert out["images"].shape == (2, 8, 8, 3) and out["images"].dtype == np.uint8
    again = editmgt.run_edits(edit_fn, params, state, batch, settings, seed=3)
    np.testing.assert_array_equal(out["images"], again["images"])

    # By hand: Euler ODE from the same noise with the same velocity.
    reference = model.encode(state, jnp.asarray(batch["source_image"]))
    text = model.encode_text(params, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]))
    x = jax.random.normal(jax.random.split(jax.random.key(3))[0], reference.shape)
    times = np.asarray(flow.timesteps(3, 1.0))
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = flow.ode_step(x, model.velocity(params, x, jnp.full((2,), t), text, reference), t, t_next)
    np.testing.assert_allclose(out["latents"], np.asarray(x), atol=1e-5)

    guided = flow_edit.FlowSettings(num_steps=3, guidance_scale=1.0)
    with_cfg = editmgt.run_edits(flow_edit.make_edit_fn(model, guided), params, state, batch, guided, seed=3)
    np.testing.assert_allclose(with_cfg["latents"], out["latents"], atol=1e-5)
    # The source matters: another source gives another edit.
    swapped = dict(batch, source_image=batch["source_image"][::-1].copy())
    other = editmgt.run_edits(edit_fn, params, state, swapped, settings, seed=3)
    assert not np.allclose(other["latents"][0], out["latents"][0])
    assert unpack_latents(jnp.asarray(out["latents"]), 4, 4, 2).shape == (2, 4, 4, 4)


def test_sample_times():
    rng = jax.random.key(0)
    logit_normal = np.asarray(flow_edit.sample_times(rng, 20000, "logit_normal"))
    assert 0 < logit_normal.min() and logit_normal.max() < 1 and abs(np.median(logit_normal) - 0.5) < 0.02
    assert np.mean(np.abs(logit_normal - 0.5) < 0.25) > 0.6  # concentrated mid-trajectory (uniform: 0.5)
    with pytest.raises(ValueError, match="timestep_sampling"):
        flow_edit.sample_times(rng, 2, "cosine")


def test_resolve_config_needs_a_kl_run(monkeypatch):
    from editing_jax import config_lib
    from editing_jax.train import checkpoint

    config = config_lib.load_config("configs/cogniedit/sft.py:size=32,tiny", [])
    config.tokenizer.checkpoint = "some/run"
    fake_run = types.SimpleNamespace(config=config_lib.load_config("configs/tokenizer/vq.py:size=32,tiny", []))
    monkeypatch.setattr(checkpoint, "load_trained", lambda path: fake_run)
    with pytest.raises(ValueError, match="tokenizer_vq run, expected tokenizer_kl"):
        flow_edit.resolve_config(config)
    fake_run.config = config_lib.load_config("configs/tokenizer/kl.py:size=32,tiny", [])
    flow_edit.resolve_config(config)
    assert json.loads(config.tokenizer.model_json)["latent_channels"] == 4 and "circle" in config.text.vocab.split()


def test_sft_trains_end_to_end_from_the_cli(tmp_path, capsys):
    short = ["--config.train.num_steps=2", "--config.mesh.data=1", "--config.data.num_eval_examples=4",
             "--config.data.eval_batch_size=4", "--config.train.eval_every=2"]  # fmt: skip
    kl_dir, sft_dir = tmp_path / "kl", tmp_path / "sft"
    code = cli.main(["--quiet", "train", "--config", "configs/tokenizer/kl.py:size=32,tiny", "--workdir", str(kl_dir),
                     *short])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = cli.main(["--quiet", "train", "--config", "configs/cogniedit/sft.py:size=32,tiny", "--workdir", str(sft_dir),
                     f"--config.tokenizer.checkpoint={kl_dir}", *short])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0.0 <= summary["eval"]["eval/verifier_success"] <= 1.0
    saved = json.loads((sft_dir / "config.json").read_text())
    assert saved["method"] == "flow_edit" and json.loads(saved["tokenizer"]["model_json"])["latent_channels"] == 4
    # GRPO / Dense GRPO on top of that SFT run: LoRA-only params, an on-policy ratio of 1, a world reward.
    for name in ("grpo", "dense_grpo"):
        config = f"configs/cogniedit/{name}.py:tiny"
        code = cli.main(["--quiet", "train", "--config", config, "--workdir", str(tmp_path / name),
                         f"--config.init_from={sft_dir}", *short])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        metrics = summary["final_metrics"]
        assert summary["compile"]["num_params"] < 10_000  # adapters only (the tiny DiT has ~60 k params)
        assert 0.0 <= metrics["reward"] <= 15.0 and metrics["log_ratio_abs"] < 1e-3
        assert 0.0 <= summary["eval"]["eval/verifier_success"] <= 1.0
