"""Optimizer and learning-rate schedule from config: AdamW, linear warmup + cosine decay, global-norm clipping."""

from __future__ import annotations

import optax


def make_schedule(config, num_steps: int) -> optax.Schedule:
    """Warmup from 0 to `learning_rate` over `warmup_steps`, then cosine (or constant) to `end_lr_fraction`."""
    peak = float(config.learning_rate)
    warmup = int(config.warmup_steps)
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1),
            end_value=peak * float(config.end_lr_fraction),
        )
    if config.decay == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup]
        )
    raise ValueError(f"unknown decay {config.decay!r}; valid: cosine, constant")


def make_optimizer(config, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule). Gradient accumulation is done by the train step, not here."""
    schedule = make_schedule(config, num_steps)
    if config.name != "adamw":
        raise ValueError(f"unknown optimizer {config.name!r}; valid: adamw")
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=float(config.b1),
            b2=float(config.b2),
            eps=float(config.eps),
            weight_decay=float(config.weight_decay),
        )
    )
    return optax.chain(*parts), schedule
