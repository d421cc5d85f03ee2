"""The generic trainer: mesh, sharded init, AOT-compiled step, resumable checkpoints, logging.

It knows nothing about models: a method supplies an `Objective` (init + pure loss); the trainer does the rest.
Resuming is exact: the train rng is `fold_in(base_rng, step)`, the data iterator state is checkpointed with the
train state, so a run killed at any moment and restarted ends bit-identical to an uninterrupted one (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from editing_jax import config_lib
from editing_jax.train import checkpoint as checkpoint_lib
from editing_jax.train import optim, sharding, writers
from editing_jax.train import step as step_lib
from editing_jax.train.objective import Objective

logger = logging.getLogger(__name__)


class TrainingAborted(Exception):
    """Training stopped on purpose (e.g. too many consecutive non-finite steps); exit non-zero."""


@dataclasses.dataclass
class CompiledStep:
    """The AOT-compiled train step and what XLA says about it."""

    executable: Any
    compile_seconds: float
    memory: dict[str, int]  # Per-device bytes from memory_analysis().
    flops: float | None  # Per-device FLOPs of one step from cost_analysis().


def _memory_dict(compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")  # fmt: skip
    return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


class Trainer:
    """Builds everything from a config; `run()` trains to `config.train.num_steps`."""

    def __init__(
        self,
        config,
        workdir: str | pathlib.Path,
        *,
        objective: Objective,
        dataset,
        eval_batches: list[dict] | None = None,
        restore: str | None = None,
        progress: bool = True,
        devices: list | None = None,
    ):
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.objective = objective
        self.dataset = dataset
        self.eval_batches = eval_batches or []
        self.progress = progress
        self.final_state: step_lib.TrainState | None = None
        self.train_config = config.train
        self.num_steps = int(self.train_config.num_steps)
        self.mesh = sharding.make_mesh(dict(config.mesh), devices)
        self.rules = sharding.rules_from_config(config.get("logical_axis_rules"))
        self.optimizer, self.schedule = optim.make_optimizer(config.optimizer, self.num_steps)
        self.init_rng, self.train_rng = jax.random.split(jax.random.key(int(config.seed)))
        self._restore_dir, self._restore_step = (None, None)
        if restore:
            self._restore_dir, self._restore_step = checkpoint_lib.resolve_restore_path(restore)

    # ---- state -------------------------------------------------------------------------------------------------

    def _host_example_batch(self) -> dict:
        """First batch of a fresh iterator: init shapes (and data-dependent init) without moving the train iterator."""
        return next(iter(self.dataset))

    def _init_fn(self, rng, batch):
        variables = self.objective.init(rng, batch)
        return step_lib.create_state(variables, self.optimizer, use_ema=float(self.train_config.ema_decay) > 0)

    def init_state(self, device_example: dict) -> tuple[step_lib.TrainState, Any]:
        """Sharded init: eval_shape -> logical specs -> mesh shardings -> jit(init, out_shardings)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            abstract_boxed = jax.eval_shape(self._init_fn, self.init_rng, device_example)
            shardings = sharding.tree_shardings(abstract_boxed, self.mesh, self.rules)
            init = jax.jit(lambda r, b: sharding.unbox(self._init_fn(r, b)), out_shardings=shardings)
            state = init(self.init_rng, device_example)
        return state, shardings

    def compile(self, state_shardings, abstract_state, abstract_batch) -> CompiledStep:
        train_step = step_lib.make_train_step(
            self.objective,
            self.optimizer,
            self.schedule,
            grad_accum_steps=int(self.train_config.grad_accum_steps),
            ema_decay=float(self.train_config.ema_decay),
        )
        replicated = sharding.replicated(self.mesh)
        batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(self.mesh), abstract_batch)
        jitted = jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_shardings, replicated),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            compiled = jitted.lower(abstract_state, abstract_batch, self.train_rng).compile()
        seconds = time.perf_counter() - start
        return CompiledStep(compiled, seconds, _memory_dict(compiled), _flops(compiled))

    # ---- loop --------------------------------------------------------------------------------------------------

    def _checkpointer(self) -> checkpoint_lib.Checkpointer:
        return checkpoint_lib.Checkpointer(
            self.workdir / "checkpoints",
            max_to_keep=int(self.train_config.max_to_keep),
            async_save=bool(self.train_config.async_checkpoint),
        )

    def run(self, *, compile_only: bool = False) -> dict:
        from editing_jax.data import pipeline

        self.workdir.mkdir(parents=True, exist_ok=True)
        config_json = config_lib.config_to_json(self.config)
        example = sharding.device_batch(self._host_example_batch(), self.mesh)
        state, state_shardings = self.init_state(example)
        abstract_state = checkpoint_lib.abstract_with_shardings(state, state_shardings)
        abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), example)
        compiled = self.compile(state_shardings, abstract_state, abstract_batch)
        compile_report = {
            "compile_seconds": round(compiled.compile_seconds, 3),
            "per_device_memory_bytes": compiled.memory,
            "per_device_flops_per_step": compiled.flops,
            "num_devices": int(self.mesh.size),
            "mesh": dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True)),
            "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        }
        logger.info("compiled train step: %s", compile_report)
        if compile_only:
            return compile_report

        checkpointer = self._checkpointer()
        data_iter = iter(self.dataset)
        start_step = 0
        restored = None
        if self._restore_dir is not None:
            source = checkpoint_lib.Checkpointer(self._restore_dir, max_to_keep=1000, async_save=False)
            step_to_restore = self._restore_step if self._restore_step is not None else source.latest_step()
            if step_to_restore is None:
                raise checkpoint_lib.CheckpointError(f"--restore {self._restore_dir} holds no committed step")
            restored = (step_to_restore, *source.restore(step_to_restore, abstract_state))
            source.close()
        elif checkpointer.latest_step() is not None:
            restored = checkpointer.restore_latest(abstract_state)
            if restored is None:
                logger.warning("no readable checkpoint in %s; starting fresh", checkpointer.directory)
        if restored is not None:
            start_step, state, data_state, _ = restored
            if data_state:
                data_iter = pipeline.restore_iterator(self.dataset, data_state)
            logger.info("resumed from step %d", start_step)
        (self.workdir / "config.json").write_text(config_json)

        writer = writers.MetricWriter(self.workdir, tensorboard=bool(self.train_config.tensorboard))
        summary, self.final_state = self._loop(
            compiled, state, data_iter, start_step, checkpointer, writer, config_json
        )
        summary["compile"] = compile_report
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary

    def _loop(self, compiled, state, data_iter: Iterator, start_step, checkpointer, writer, config_json) -> dict:
        from editing_jax.data import pipeline

        cfg = self.train_config
        log_every, ckpt_every = int(cfg.log_every), int(cfg.checkpoint_every)
        sample_every, eval_every = int(cfg.sample_every), int(cfg.eval_every)
        max_nonfinite = int(cfg.max_consecutive_nonfinite)
        bar = None
        if self.progress:
            import tqdm

            bar = tqdm.tqdm(total=self.num_steps, initial=start_step, desc=self.objective.name, unit="step",
                            dynamic_ncols=True)  # fmt: skip
        last_metrics, host_batch = None, None
        step = start_step
        loop_start = time.perf_counter()
        for step in range(start_step + 1, self.num_steps + 1):
            host_batch = next(data_iter)
            batch = sharding.device_batch(host_batch, self.mesh)
            state, metrics = compiled.executable(state, batch, self.train_rng)
            if last_metrics is not None and int(last_metrics["consecutive_nonfinite"]) >= max_nonfinite:
                raise TrainingAborted(f"{max_nonfinite} consecutive non-finite steps before step {step}; stopping")
            last_metrics = metrics
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == self.num_steps:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                scalars["steps_per_second"] = (step - start_step) / (time.perf_counter() - loop_start)
                writer.write_scalars(step, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
            if sample_every and self.objective.visualize and (step % sample_every == 0 or step == self.num_steps):
                self._write_samples(step, state, host_batch, writer)
            if eval_every and self.objective.evaluate and self.eval_batches and step % eval_every == 0:
                writer.write_scalars(step, self._evaluate(state))
            if step % ckpt_every == 0 or step == self.num_steps:
                checkpointer.save(step, state, pipeline.iterator_state(data_iter), config_json, force=True)
        if last_metrics is not None and int(last_metrics["consecutive_nonfinite"]) >= max_nonfinite:
            raise TrainingAborted(f"{max_nonfinite} consecutive non-finite steps at the end of training")
        wall = time.perf_counter() - loop_start
        if bar is not None:
            bar.close()
        final = {k: float(v) for k, v in jax.device_get(last_metrics).items()} if last_metrics is not None else {}
        summary = {
            "steps": step,
            "steps_this_run": step - start_step,
            "wall_seconds": round(wall, 3),
            "steps_per_second": (step - start_step) / wall if wall > 0 else None,
            "final_metrics": final,
        }
        if self.objective.evaluate and self.eval_batches:
            summary["eval"] = self._evaluate(state)
            writer.write_scalars(step, summary["eval"])
        return summary, state

    def _write_samples(self, step: int, state, host_batch, writer) -> None:
        from editing_jax import viz

        rows, labels = self.objective.visualize(state.params, state.model_state, host_batch)
        writer.write_image(step, "samples", viz.image_grid(rows, column_labels=labels, cell_size=96))

    def _evaluate(self, state) -> dict[str, float]:
        metrics = self.objective.evaluate(state.params, state.model_state, self.eval_batches)
        return {f"eval/{k}": float(v) for k, v in metrics.items()}


def build_trainer(config, workdir, *, restore: str | None = None, progress: bool = True, with_eval: bool = True,
                  devices: list | None = None) -> Trainer:  # fmt: skip
    """The objective for `config.method`, its data pipelines and a Trainer (what `editing-jax train` runs).

    Raises ValueError for an invalid config.
    """
    from editing_jax import methods
    from editing_jax.train import data as train_data

    objective = methods.build_objective(config)
    dataset = train_data.make_train_dataset(config.data, objective.prepare_batch)
    eval_batches = train_data.make_eval_batches(config.data, objective.prepare_batch) if with_eval else []
    return Trainer(
        config,
        workdir,
        objective=objective,
        dataset=dataset,
        eval_batches=eval_batches,
        restore=restore,
        progress=progress,
        devices=devices,
    )
