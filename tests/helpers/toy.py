"""A tiny model-agnostic objective and data source for trainer tests (also run as a subprocess script)."""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from editing_jax.data import pipeline
from editing_jax.train import defaults
from editing_jax.train.objective import LossAux, Objective

DIM, HIDDEN = 8, 64


class ToySource:
    """Deterministic regression examples: y = sum(sin(x))."""

    def __init__(self, num: int = 256):
        self.num = num

    def __len__(self):
        return self.num

    def __getitem__(self, index):
        x = np.random.default_rng(index).normal(size=DIM).astype(np.float32)
        return {"x": x, "y": np.sin(x).sum(keepdims=True).astype(np.float32)}


class ToyMLP(nn.Module):
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):  # x: [B, DIM]
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        h = nn.gelu(nn.Dense(self.hidden, kernel_init=init, name="fc1")(x))  # [B, hidden]
        out_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        return nn.Dense(1, kernel_init=out_init, name="fc2")(h)  # [B, 1]


def toy_objective(nan_at_steps: tuple[int, ...] = ()) -> Objective:
    model = ToyMLP()

    def init(rng, batch):
        variables = model.init(rng, batch["x"])
        return {"params": variables["params"], "counters": {"seen": jnp.zeros((), jnp.float32)}}

    def loss(params, model_state, batch, rng):
        pred = model.apply({"params": params}, batch["x"])
        noise = 1e-3 * jax.random.normal(rng, pred.shape)  # Uses the rng, so rng handling is tested too.
        value = jnp.mean((pred + noise - batch["y"]) ** 2)
        if nan_at_steps:
            bad = jnp.isin(model_state["counters"]["seen"], jnp.asarray(nan_at_steps, jnp.float32))
            value = jnp.where(bad, jnp.nan, value)
        new_state = {"counters": {"seen": model_state["counters"]["seen"] + 1}}
        return value, LossAux(metrics={"mse": value}, model_state=new_state)

    return Objective(name="toy", init=init, loss=loss)


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.optimizer = defaults.optimizer_config(learning_rate=3e-3, warmup_steps=5)
    train = {"num_steps": 40, "log_every": 5, "checkpoint_every": 10, "sample_every": 0, "tensorboard": False}
    config.train = defaults.train_config(**{**train, **train_overrides})
    config.mesh = defaults.mesh_config()
    config.lock()
    return config


def toy_dataset(batch_size: int = 16):
    return pipeline.make_dataset(ToySource(), batch_size=batch_size, seed=1, shuffle=True, num_epochs=None)


def main():
    """Trains the toy model in `--workdir` and writes final params to `--out` (for kill/resume tests)."""
    from editing_jax.train import trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_steps", type=int, default=40)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--restore", default=None)
    args = parser.parse_args()
    config = toy_config(checkpoint_every=args.checkpoint_every)
    with config.unlocked():
        config.train.num_steps = args.num_steps
        config.mesh.fsdp = args.fsdp
    run = trainer.Trainer(config, args.workdir, objective=toy_objective(), dataset=toy_dataset(), restore=args.restore,
                          progress=False)  # fmt: skip
    summary = run.run()
    state = run.final_state
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
        {"params": state.params, "opt": state.opt_state, "model_state": state.model_state})}  # fmt: skip
    np.savez(args.out, **leaves)
    print(json.dumps({"steps": summary["steps"]}))


if __name__ == "__main__":
    main()
