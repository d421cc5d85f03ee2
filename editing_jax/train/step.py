"""Train state and the pure, generic train step `(state, batch, base_rng) -> (state, metrics)`.

The step is method-agnostic: it calls the objective's loss, optionally accumulates gradients over micro-batches,
applies the optimizer, keeps an EMA of params, and guards against non-finite values: a step whose loss or
gradients are not finite leaves params, model state, optimizer state and EMA bit-identical and bumps counters.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from editing_jax.train.objective import Objective

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps taken, including skipped ones (drives rng and data).
    params: PyTree
    model_state: PyTree  # Non-param collections (e.g. {'state': {...}}).
    opt_state: PyTree
    ema_params: PyTree | None
    skipped_steps: jax.Array  # int32: total non-finite steps skipped.
    consecutive_nonfinite: jax.Array  # int32: current run of non-finite steps.


def create_state(variables: dict, optimizer: optax.GradientTransformation, use_ema: bool) -> TrainState:
    """Builds a fresh state from init variables (boxed params are fine: annotations flow into opt state).

    A model without parameters (e.g. a patch VQ whose codebook is EMA state) trains with params = {}.
    """
    variables = dict(variables)
    params = variables.pop("params", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _split_microbatches(batch, num_micro: int):
    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={num_micro}")
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

    return jax.tree.map(split, batch)


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
):
    """Returns the pure train step function (jit it with shardings and donation in the trainer)."""
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

    def compute_grads(state: TrainState, batch, rng):
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, state.model_state, batch, rng)
            return loss, aux.metrics, aux.model_state, grads

        micro = _split_microbatches(batch, grad_accum_steps)

        def body(carry, inputs):
            model_state, grad_sum, loss_sum = carry
            index, microbatch = inputs
            (loss, aux), grads = grad_fn(state.params, model_state, microbatch, jax.random.fold_in(rng, index))
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (aux.model_state, grad_sum, loss_sum + loss), aux.metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (state.model_state, zeros, jnp.zeros((), jnp.float32))
        (model_state, grad_sum, loss_sum), metrics = jax.lax.scan(body, carry, (jnp.arange(grad_accum_steps), micro))
        scale = 1.0 / grad_accum_steps
        grads = jax.tree.map(lambda g: g * scale, grad_sum)
        return loss_sum * scale, jax.tree.map(jnp.mean, metrics), model_state, grads

    def train_step(state: TrainState, batch, base_rng: jax.Array):
        rng = jax.random.fold_in(base_rng, state.step)
        loss, metrics, new_model_state, grads = compute_grads(state, batch, rng)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = state.ema_params
        if state.ema_params is not None:
            new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_params)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(new_params, state.params),
            model_state=keep_if_finite(new_model_state, state.model_state),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            ema_params=keep_if_finite(new_ema, state.ema_params) if new_ema is not None else None,
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            consecutive_nonfinite=jnp.where(finite, 0, state.consecutive_nonfinite + 1),
        )
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=_global_norm(grads),
            param_norm=_global_norm(new_state.params),
            update_norm=_global_norm(updates),
            learning_rate=schedule(state.step - state.skipped_steps),  # The optimizer counts applied updates only.
            skipped_steps=new_state.skipped_steps,
            consecutive_nonfinite=new_state.consecutive_nonfinite,
        )
        return new_state, metrics

    return train_step
