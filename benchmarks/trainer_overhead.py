"""python benchmarks/trainer_overhead.py --config configs/tokenizer/vq.py:size=32,tiny --steps 200

Steps/s of the generic trainer vs a minimal hand-written jitted loop (value_and_grad + optax update, same model,
same optimizer, same batch), measured side by side in one process. Both loops feed the same host batch every step
(the trainer through its normal device_batch path), checkpoint/sample/eval are pushed past the end, and metrics are
logged at the config's log_every. Target: ratio >= 0.95. Writes JSON (default benchmarks/results/trainer_overhead.json).
"""

import argparse
import json
import pathlib
import platform
import tempfile
import time

import jax
import optax

from editing_jax import config_lib, methods
from editing_jax.train import data as train_data
from editing_jax.train import optim, sharding, trainer


class RepeatBatch:
    """An endless iterable of one host batch, with the grain-like state API the trainer checkpoints."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def get_state(self):
        return {}

    def set_state(self, state):
        del state


def hand_loop(objective, config, host_batch, steps: int) -> float:
    optimizer, _ = optim.make_optimizer(config.optimizer, steps)
    batch = sharding.device_batch(host_batch, sharding.make_mesh({"data": -1}))
    variables = sharding.unbox(objective.init(jax.random.key(0), batch))
    params = variables.pop("params")
    model_state = variables
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, model_state, opt_state, rng):
        (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, model_state, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), aux.model_state, opt_state, loss

    rng = jax.random.key(1)
    params, model_state, opt_state, loss = step(params, model_state, opt_state, rng)  # Compile.
    loss.block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        params, model_state, opt_state, loss = step(params, model_state, opt_state, jax.random.fold_in(rng, i))
    loss.block_until_ready()
    return steps / (time.perf_counter() - start)


def trainer_loop(objective, config, host_batch, steps: int) -> float:
    with config.unlocked():
        config.train.num_steps = steps
        config.train.checkpoint_every = 10**9
        config.train.sample_every = 0
        config.train.eval_every = 0
        config.train.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        run = trainer.Trainer(config, workdir, objective=objective, dataset=RepeatBatch(host_batch), progress=False)
        summary = run.run()
    return summary["steps_per_second"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tokenizer/vq.py:size=32,tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/trainer_overhead.json")
    args = parser.parse_args()
    config = config_lib.load_config(args.config)
    with config.unlocked():
        config.mesh.data = 1  # One device for both loops: the comparison is about loop overhead.
    objective = methods.build_objective(config)
    host_batch = next(iter(train_data.make_train_dataset(config.data)))
    hand, ours = [], []
    for _ in range(args.repeats):  # Interleaved so drift affects both.
        hand.append(hand_loop(objective, config, host_batch, args.steps))
        ours.append(trainer_loop(objective, config, host_batch, args.steps))
    result = {
        "config": args.config,
        "steps": args.steps,
        "machine": platform.machine(),
        "devices": jax.device_count(),
        "hand_loop_steps_per_s": max(hand),
        "trainer_steps_per_s": max(ours),
        "ratio_best": max(ours) / max(hand),
        "all_hand": hand,
        "all_trainer": ours,
    }
    print(json.dumps(result, sort_keys=True))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
