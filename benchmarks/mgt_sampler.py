"""Sampler overhead: time of one whole edit / (S x time of one jitted MGT forward at the same batch).

The edit is one compiled function (VQ encode, S MaskGIT steps with attention consolidation, smoothing and region
hold, VQ decode); the forward is the model call one step makes (CFG-batched when guidance is on, attention capture
of the consolidated layers). Both are timed side by side in one process, best of `--repeats`.

  python benchmarks/mgt_sampler.py --checkpoint workdir/quickstart/editmgt --batch 1 --steps 12
  python benchmarks/mgt_sampler.py --config configs/editmgt/edit.py:size=32,quick --batch 8  # random weights

Writes benchmarks/results/mgt_sampler.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _editor_from_config(spec: str):
    from editing_jax import config_lib, inference
    from editing_jax.methods import editmgt
    from editing_jax.models.vq import VQModel

    config = config_lib.load_config(spec)
    vq_config = config_lib.load_config(
        str(pathlib.Path(__file__).resolve().parents[1] / f"configs/tokenizer/vq.py:size={config.data.size},quick")
    )
    with config.unlocked():
        config.tokenizer.model_json = json.dumps(vq_config.model.to_dict())
    editmgt.resolve_config(config)
    model = editmgt.build_model(config)
    size = model.image_size
    vq_vars = model.vq.init(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    assert isinstance(model.vq, VQModel)
    objective = editmgt.make_objective(
        model, vq_vars, cfg_dropout=0.0, settings=editmgt.SamplingSettings.from_config(config.sampling),
        eval_threshold=0.0,
    )  # fmt: skip
    batch = _batch(model, 2)
    variables = objective.init(jax.random.key(0), {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != object})
    return inference.Editor(model, variables["params"], {"tokenizer": variables["tokenizer"]}, config, 0)


def _batch(model, batch_size: int) -> dict:
    from editing_jax.data import pipeline
    from editing_jax.data.world import edits

    source = pipeline.WorldSource("test", batch_size, 0, edits.WorldConfig(size=model.image_size))
    return model.prepare_batch(pipeline.collate([source[i] for i in range(batch_size)]))


def _best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="trained EditMGT run")
    group.add_argument("--config", help="EditMGT config (random weights)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--region_hold_threshold", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prng", default="threefry2x32", help="PRNG implementation of the sampler key")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "mgt_sampler.json"))
    args = parser.parse_args()

    from editing_jax import inference
    from editing_jax.methods import editmgt

    editor = inference.load_editor(args.checkpoint) if args.checkpoint else _editor_from_config(args.config)
    settings = editor.settings(num_steps=args.steps, guidance_scale=args.guidance)
    batch = _batch(editor.model, args.batch)
    edit_fn = editor.edit_fn(settings)
    text_positions = jnp.asarray(editmgt.text_positions_for(batch, settings.text_positions))
    source = jnp.asarray(batch["source_image"])
    ids, mask = jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"])

    def one_edit():
        return edit_fn(editor.params, editor.model_state, source, ids, mask, text_positions, jax.random.key(0),
                       jnp.float32(args.region_hold_threshold), jnp.float32(settings.gamma))  # fmt: skip

    model = editor.model
    start, stop = settings.attention_layers
    capture = tuple(range(start, stop))
    copies = 2 if settings.guidance_scale != 0.0 else 1
    tokens = jnp.zeros((copies * args.batch, model.token_grid, model.token_grid), jnp.int32)
    cond = tokens if model.uses_condition else None

    @jax.jit
    def forward(params, tokens, ids, mask):
        hidden, pooled = model.encode_text(params, ids, mask)
        text = (hidden, mask, pooled)
        fraction = jnp.ones((tokens.shape[0],), jnp.float32)
        return model.logits(params, tokens, text, fraction, cond, gamma=jnp.float32(1.0), capture_layers=capture,
                            model_state=editor.model_state)  # fmt: skip

    fwd_ids, fwd_mask = jnp.concatenate([ids] * copies), jnp.concatenate([mask] * copies)
    edit_seconds = _best_time(one_edit, args.repeats)
    forward_seconds = _best_time(lambda: forward(editor.params, tokens, fwd_ids, fwd_mask), args.repeats)
    ratio = edit_seconds / (args.steps * forward_seconds)
    result = {
        "command": "python benchmarks/mgt_sampler.py "
        + (f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--config {args.config}")
        + f" --batch {args.batch} --steps {args.steps} --guidance {args.guidance}",
        "batch": args.batch,
        "steps": args.steps,
        "guidance": args.guidance,
        "edit_seconds": edit_seconds,
        "forward_seconds": forward_seconds,
        "overhead_ratio": ratio,
        "edits_per_second": args.batch / edit_seconds,
        "device": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    if not np.isfinite(ratio):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
