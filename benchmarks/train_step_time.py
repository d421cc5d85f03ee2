"""Seconds per compiled train step, and its compile time, for several override sets of one config, side by side.

    python benchmarks/train_step_time.py --config configs/editmgt/edit.py:size=32,quick \
        --base "--config.tokenizer.checkpoint=workdir/vqp --config.data.num_eval_examples=0" \
        --variant "" --variant "--config.model.source_copy=False" [--steps 20]

Each variant builds its trainer, compiles the step ahead of time, runs one warm-up step and then `--steps` steps on
one fixed batch (no data loading, logging or checkpoints: the loop's own overhead is not included). One JSON line per
variant. XLA flags act per process: run the script once per `XLA_FLAGS` value to compare them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time

import jax

from editing_jax import config_lib
from editing_jax.train import checkpoint, sharding, trainer


def measure(config_spec: str, overrides: list[str], steps: int) -> dict:
    config = config_lib.load_config(config_spec, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        run = trainer.build_trainer(config, workdir, progress=False, with_eval=False)
        example = sharding.device_batch(run._host_example_batch(), run.mesh)
        state, shardings = run.init_state(example)
        abstract_state = checkpoint.abstract_with_shardings(state, shardings)
        abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), example)
        compiled = run.compile(shardings, abstract_state, abstract_batch)
        state, metrics = compiled.executable(state, example, run.train_rng)  # warm-up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled.executable(state, example, run.train_rng)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
    return {
        "overrides": overrides,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seconds_per_step": round(seconds, 4),
        "gflop_per_step": round((compiled.flops or 0.0) / 1e9, 2),
        "compile_seconds": round(compiled.compile_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config spec, e.g. configs/editmgt/edit.py:size=32,quick")
    parser.add_argument("--base", default="", help="overrides shared by every variant (one shell-quoted string)")
    parser.add_argument("--variant", action="append", default=None, help="extra overrides of one variant")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    args = parser.parse_args()
    if args.steps <= 0:
        parser.error("--steps must be positive")
    for variant in args.variant or [""]:
        result = measure(args.config, shlex.split(args.base) + shlex.split(variant), args.steps)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
