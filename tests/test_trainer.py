"""Generic trainer: training, sharding (8 fake CPU devices), non-finite guard, checkpoints and exact resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from editing_jax import config_lib
from editing_jax.train import checkpoint as checkpoint_lib
from editing_jax.train import optim, trainer
from editing_jax.train import step as step_lib
from tests.helpers import toy

REPO = pathlib.Path(__file__).parents[1]


def _run(tmp_path, name="run", objective=None, devices=None, restore=None, **train_overrides):
    config = toy.toy_config(**train_overrides)
    run = trainer.Trainer(
        config, tmp_path / name, objective=objective or toy.toy_objective(), dataset=toy.toy_dataset(),
        progress=False, devices=devices, restore=restore,
    )  # fmt: skip
    return run, run.run()


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.model_state))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run on all 8 devices."""
    run, summary = _run(tmp_path_factory.mktemp("reference"))
    return run, summary


def test_training_reduces_loss_and_writes_outputs(reference):
    run, summary = reference
    records = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40 and records[-1]["loss"] < 0.5 * records[0]["loss"]
    for key in ("grad_norm", "param_norm", "update_norm", "learning_rate", "skipped_steps", "mse"):
        assert key in records[-1]
    assert summary["steps"] == 40 and summary["steps_per_second"] > 0
    assert json.loads((run.workdir / "summary.json").read_text())["steps"] == 40
    assert int(run.final_state.model_state["counters"]["seen"]) == 40


def test_checkpoint_holds_config_and_data_state(reference):
    run, _ = reference
    checkpointer = checkpoint_lib.Checkpointer(run.workdir / "checkpoints", async_save=False)
    assert checkpointer.steps() == [20, 30, 40]  # max_to_keep = 3
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.final_state)
    state, data_state, config = checkpointer.restore(40, abstract)
    assert config_lib.config_to_json(config_lib.config_from_json(json.dumps(config))) == config_lib.config_to_json(
        run.config
    )
    assert data_state  # The grain iterator position.
    for a, b in zip(_leaves(state), _leaves(run.final_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sharded_training_matches_single_device(tmp_path, reference):
    run_8, _ = reference
    run_1, _ = _run(tmp_path, devices=jax.devices()[:1])
    for a, b in zip(_leaves(run_8.final_state), _leaves(run_1.final_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_fsdp_puts_an_eighth_of_large_params_on_each_device(tmp_path):
    config = toy.toy_config(num_steps=1)
    with config.unlocked():
        config.mesh.fsdp = 8
        config.mesh.data = 1
    run = trainer.Trainer(config, tmp_path, objective=toy.toy_objective(), dataset=toy.toy_dataset(), progress=False)
    state = run.init_state(jax.tree.map(jnp.asarray, {k: v for k, v in next(iter(run.dataset)).items()}))[0]
    kernel = state.params["fc1"]["kernel"]  # [8, 64], logical ('embed', 'mlp') -> dim 0 on fsdp
    shard_shapes = {s.data.shape for s in kernel.addressable_shards}
    assert shard_shapes == {(1, 64)} and len(kernel.addressable_shards) == 8
    adam_mu = state.opt_state[1][0].mu["fc1"]["kernel"]
    assert {s.data.shape for s in adam_mu.addressable_shards} == {(1, 64)}
    bias = state.params["fc1"]["bias"]  # Unannotated: replicated.
    assert {s.data.shape for s in bias.addressable_shards} == {(64,)}


def _step_fixture(grad_accum_steps=1, ema_decay=0.0):
    objective = toy.toy_objective()
    optimizer, schedule = optim.make_optimizer(toy.toy_config().optimizer, 100)
    batch = jax.tree.map(jnp.asarray, next(iter(toy.toy_dataset(batch_size=8))))
    variables = objective.init(jax.random.key(0), batch)
    state = step_lib.create_state(jax.tree.map(jnp.asarray, variables), optimizer, use_ema=ema_decay > 0)
    state = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, state)
    train_step = jax.jit(
        step_lib.make_train_step(objective, optimizer, schedule, grad_accum_steps=grad_accum_steps,
                                 ema_decay=ema_decay)
    )  # fmt: skip
    return state, batch, train_step


def test_nonfinite_step_leaves_state_bit_identical():
    state, batch, train_step = _step_fixture()
    state, _ = train_step(state, batch, jax.random.key(1))
    bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))
    new_state, metrics = train_step(state, bad, jax.random.key(1))
    for a, b in zip(_leaves(state), _leaves(new_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == int(state.step) + 1
    assert int(metrics["skipped_steps"]) == 1 and int(metrics["consecutive_nonfinite"]) == 1
    recovered, metrics = train_step(new_state, batch, jax.random.key(1))
    assert int(metrics["consecutive_nonfinite"]) == 0 and int(metrics["skipped_steps"]) == 1
    assert not np.array_equal(_leaves(recovered)[0], _leaves(new_state)[0])


def test_training_aborts_after_consecutive_nonfinite_steps(tmp_path):
    objective = toy.toy_objective()

    def always_nan(params, model_state, batch, rng):
        loss, aux = objective.loss(params, model_state, batch, rng)
        return loss * jnp.nan, aux

    broken = toy.Objective(name="broken", init=objective.init, loss=always_nan)
    with pytest.raises(trainer.TrainingAborted, match="3 consecutive non-finite"):
        _run(tmp_path, objective=broken, max_consecutive_nonfinite=3)


def test_gradient_accumulation_matches_full_batch():
    state_full, batch, step_full = _step_fixture(grad_accum_steps=1)
    state_micro, _, step_micro = _step_fixture(grad_accum_steps=2)
    full, metrics_full = step_full(state_full, batch, jax.random.key(2))
    micro, metrics_micro = step_micro(state_micro, batch, jax.random.key(2))
    np.testing.assert_allclose(float(metrics_full["grad_norm"]), float(metrics_micro["grad_norm"]), rtol=1e-2)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(micro.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)


def test_ema_tracks_params():
    state, batch, train_step = _step_fixture(ema_decay=0.5)
    new_state, _ = train_step(state, batch, jax.random.key(3))
    for ema, old, new in zip(*(jax.tree.leaves(t) for t in (new_state.ema_params, state.params, new_state.params)),
                             strict=True):  # fmt: skip
        np.testing.assert_allclose(ema, 0.5 * old + 0.5 * new, rtol=1e-6, atol=1e-7)


def test_compile_only_reports_memory_and_flops(tmp_path):
    config = toy.toy_config()
    run = trainer.Trainer(config, tmp_path, objective=toy.toy_objective(), dataset=toy.toy_dataset(), progress=False)
    report = run.run(compile_only=True)
    assert report["per_device_flops_per_step"] > 0
    assert report["per_device_memory_bytes"]["argument_size_in_bytes"] > 0
    assert not (tmp_path / "checkpoints").exists()


def test_restore_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(checkpoint_lib.CheckpointError, match="does not exist"):
        _run(tmp_path, restore=str(tmp_path / "nope"))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, reference, caplog):
    run, _ = _run(tmp_path, name="r")
    ckpt = run.workdir / "checkpoints"
    # Truncate every array file of the latest step, and leave an uncommitted temporary step behind.
    truncated = 0
    for path in (ckpt / "40").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            truncated += 1
    assert truncated
    (ckpt / "45.orbax-checkpoint-tmp-1").mkdir()
    resumed, summary = _run(tmp_path, name="r")
    assert summary["steps_this_run"] == 10  # Resumed from step 30, not the corrupt 40.
    assert "checkpoint step 40" in caplog.text and "unreadable" in caplog.text
    for a, b in zip(_leaves(resumed.final_state), _leaves(reference[0].final_state), strict=True):
        np.testing.assert_array_equal(a, b)


def _toy_script(workdir, out, *extra, devices=8):
    device_flag = "--xla_force_host_platform_device_count="
    flags = [flag for flag in os.environ["XLA_FLAGS"].split() if not flag.startswith(device_flag)]  # conftest.py's
    env = dict(os.environ, XLA_FLAGS=" ".join([*flags, f"{device_flag}{devices}"]), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "tests.helpers.toy", "--workdir", str(workdir), "--out", str(out), *extra]
    return command, env


def test_restore_onto_a_different_device_count(tmp_path, reference):
    """Checkpoint step 20 of the 8-device reference, restored explicitly on 1 device and trained to 40."""
    ref_run = reference[0]
    command, env = _toy_script(
        tmp_path / "one", tmp_path / "one.npz", "--restore", str(ref_run.workdir / "checkpoints" / "20"), devices=1
    )
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
    resumed = np.load(tmp_path / "one.npz")
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["steps_this_run"] == 20
    np.testing.assert_allclose(
        resumed["['params']['fc1']['kernel']"], ref_run.final_state.params["fc1"]["kernel"], rtol=1e-4, atol=1e-5
    )


def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path):
    args = ("--num_steps", "60", "--checkpoint_every", "3")
    command, env = _toy_script(tmp_path / "ref", tmp_path / "ref.npz", *args)
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
    rng = np.random.default_rng(0)
    workdir = tmp_path / "killed"
    command, env = _toy_script(workdir, tmp_path / "killed.npz", *args)
    kills = 0
    for _ in range(3):
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.5, 5.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
    assert kills >= 1
    reference, resumed = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(reference.files) == sorted(resumed.files)
    for key in reference.files:
        np.testing.assert_array_equal(reference[key], resumed[key], err_msg=key)


def test_lr_scales_multiply_the_learning_rate_of_named_parameter_groups():
    config = ml_collections.ConfigDict(dict(toy.toy_config().optimizer))
    config.warmup_steps, config.grad_clip_norm, config.weight_decay = 0, 0.0, 0.0
    params = {"mgt": jnp.ones((3,)), "text_encoder": jnp.ones((3,)), "head": jnp.ones((2,))}
    grads = {"mgt": jnp.full((3,), 0.5), "text_encoder": jnp.full((3,), 0.5), "head": jnp.full((2,), 0.5)}

    def first_update(spec):
        config.lr_scales = spec
        optimizer, _ = optim.make_optimizer(config, 100)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return {name: float(jnp.abs(u).mean()) for name, u in updates.items()}

    plain, scaled = first_update(""), first_update("text_encoder=0.25, head=0")
    assert plain["mgt"] > 0 and scaled["mgt"] == pytest.approx(plain["mgt"])
    assert scaled["text_encoder"] == pytest.approx(0.25 * plain["text_encoder"])
    assert scaled["head"] == 0.0
    with pytest.raises(ValueError, match="parameter groups are"):
        first_update("text=0.5")
    for bad in ("text_encoder", "text_encoder=x", "=1", "mgt=-1"):
        with pytest.raises(ValueError, match="group=scale"):
            optim.parse_lr_scales(bad)
