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


def parse_lr_scales(spec: str) -> dict[str, float]:
    """'text_encoder=0.25,mgt=1' -> {'text_encoder': 0.25, 'mgt': 1.0} ('' -> {})."""
    scales = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            scale = float(value) if name else -1.0
        except ValueError:
            scale = -1.0
        if scale < 0:
            raise ValueError(f"optimizer.lr_scales: expected 'group=scale,...' with scales >= 0, got {spec!r}")
        scales[name] = scale
    return scales


def make_optimizer(config, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule). Gradient accumulation is done by the train step, not here.

    `config.lr_scales` ('group=scale,...', optional) multiplies the learning rate (and so the decoupled weight decay)
    of the top-level parameter groups it names, e.g. 'text_encoder=0.25' for EditMGT's text encoder; an unknown group
    is an error when the optimizer is initialized. The global-norm clip is taken over all groups together.
    """
    schedule = make_schedule(config, num_steps)
    if config.name != "adamw":
        raise ValueError(f"unknown optimizer {config.name!r}; valid: adamw")

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate=schedule if scale == 1.0 else (lambda step: scale * schedule(step)),
            b1=float(config.b1),
            b2=float(config.b2),
            eps=float(config.eps),
            weight_decay=float(config.weight_decay),
        )

    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
    scales = parse_lr_scales(config.get("lr_scales", ""))
    if not scales:
        parts.append(adamw(1.0))
        return optax.chain(*parts), schedule

    default = "__default__"

    def labels(params):
        unknown = sorted(set(scales) - set(params))
        if unknown:
            raise ValueError(f"optimizer.lr_scales names {unknown}; parameter groups are {sorted(params)}")
        return {name: name if name in scales else default for name in params}

    transforms = {default: adamw(1.0), **{name: adamw(scale) for name, scale in scales.items()}}
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts), schedule
