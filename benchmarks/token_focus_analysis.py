"""Where Dynamic Token Focus Relocation puts its soft tokens (CogniEdit Fig. 7 analogue), per layer.

  python benchmarks/token_focus_analysis.py --run workdir/cogniedit_dense_focus --num 128 \
      --out benchmarks/results/token_focus_analysis.json

For `--num` examples of a split, the run's policy evaluates one velocity at each of `--times` (x_t interpolated
between the target's latents and noise) and records, per focus layer:
  * the chosen start positions (histogram over text positions),
  * how often the xi-token window overlaps the instruction's keyword span (the referring phrase, e.g. 'red
    circle') versus how often a uniformly random valid window would,
  * the predictor's text-importance mass on keyword tokens versus the uniform share (keyword tokens / real tokens),
  * the mean gate (0 = the layer's focus is switched off).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def uniform_overlap(length: int, window: int, keyword: np.ndarray) -> float:
    """P(a uniformly drawn window inside the first `length` tokens overlaps the keyword positions)."""
    starts = range(max(length - window + 1, 1))
    return float(np.mean([keyword[s : s + window].any() for s in starts]))


def analyze(run: str, split: str, num: int, batch_size: int, times: list[float]) -> dict:
    import jax
    import jax.numpy as jnp

    from editing_jax import inference
    from editing_jax.data import pipeline
    from editing_jax.data.world import edits
    from editing_jax.methods import flow_edit

    editor = inference.load_editor(run)
    model, params, state = editor.model, editor.params, editor.model_state
    layers = model.dit.focus_layers
    if not layers:
        raise SystemExit(f"{run} has no token focus (model.token_focus_tokens = 0)")
    window = model.dit.token_focus_tokens
    source = pipeline.WorldSource(split, num, int(editor.config.data.seed), edits.WorldConfig(size=model.image_size))
    dataset = pipeline.make_dataset(source, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                                    drop_remainder=False)  # fmt: skip
    maps_fn = jax.jit(model.token_focus_maps)
    starts, overlaps, chance, mass, share = [], [], [], [], []
    for index, batch in enumerate(dataset):
        batch = model.prepare_batch(batch)
        text = model.encode_text(params, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]))
        reference = model.encode(state, jnp.asarray(batch["source_image"]))  # [B, L, C]
        target = model.encode(state, jnp.asarray(batch["target_image"]))
        keyword = np.asarray(batch["keyword_mask"], bool)  # [B, Lt]
        lengths = np.asarray(batch["text_mask"], bool).sum(-1)  # [B]
        noise = jax.random.normal(jax.random.key(index), target.shape)
        for t in times:
            x_t = flow_edit.interpolate(target, noise, jnp.full((target.shape[0],), t))
            maps = jax.device_get(maps_fn(params, x_t, jnp.full((target.shape[0],), t), text, reference))
            start = maps["focus_start"]  # [N, B]
            covered = np.stack([[keyword[b, s : s + window].any() for b, s in enumerate(row)] for row in start])
            starts.append(start)
            overlaps.append(covered)  # [N, B]
            chance.append([uniform_overlap(n, window, k) for n, k in zip(lengths, keyword, strict=True)])
            mass.append((maps["token_importance"] * keyword[None]).sum(-1))  # [N, B]
            share.append(keyword.sum(-1) / np.maximum(lengths, 1))  # [B]
    starts, overlaps, mass = (np.concatenate(x, axis=1) for x in (starts, overlaps, mass))
    chance, share = np.concatenate(chance), np.concatenate(share)
    has_keyword = share > 0  # identity edits have no keyword
    gates = {
        layer: float(params["dit"][f"token_focus_{layer}"]["gate"]) for layer in layers
    }  # the learned blend per layer
    rows = []
    max_len = int(editor.config.text.max_length)
    for i, layer in enumerate(layers):
        rows.append(
            {
                "layer": int(layer),
                "gate": gates[layer],
                "start_histogram": np.bincount(starts[i], minlength=max_len - window + 1).tolist(),
                "keyword_overlap": float(overlaps[i][has_keyword].mean()),
                "keyword_overlap_uniform": float(chance[has_keyword].mean()),
                "keyword_importance": float(mass[i][has_keyword].mean()),
                "keyword_importance_uniform": float(share[has_keyword].mean()),
            }
        )
    return {"run": run, "step": editor.step, "split": split, "num_examples": int(num), "times": times,
            "window": int(window), "layers": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--times", type=float, nargs="+", default=[0.9, 0.5, 0.1])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = analyze(args.run, args.split, args.num, args.batch_size, args.times)
    for row in result["layers"]:
        print(json.dumps({k: v for k, v in row.items() if k != "start_histogram"}), flush=True)
    if args.out:
        result["command"] = f"python benchmarks/token_focus_analysis.py --run {args.run} --num {args.num}"
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
