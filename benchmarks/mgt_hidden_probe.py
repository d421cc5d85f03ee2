"""Where does an EditMGT model lose the instruction's new color? Ridge probes on its activations at recolored tokens.

  python benchmarks/mgt_hidden_probe.py --checkpoint workdir/mgt_quick_capchg [--num_train 400 --num_test 200]

For the world's color edits (source tokens conditioning, every target token masked, as the one-step editor runs),
the activations at the tokens a recolor changes are collected: the update of each text cross-attention block
(upsampled from its grid), the trunk's output after the 2x upsampling (`up_block`) and the MLM head's input (that
plus the source skip). A ridge classifier fit on `train` edits scores the target color on `test` edits (accuracy,
chance 1/8), next to the share of the raw activations' variance the target color's class means explain.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from text_color_probe import COLORS, _ridge_accuracy, _variance_share


def recolored_activations(editor, split: str, num: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Activations `{name: [T, D]}` at the T changed tokens of `num` color edits and their target colors `[T]`."""
    import jax.numpy as jnp

    from editing_jax.data import pipeline
    from editing_jax.data.world import edits

    model, params, state = editor.model, editor.params, editor.model_state
    source = pipeline.WorldSource(split, num, 0, edits.WorldConfig(size=editor.image_size, edit_types=("color",)))
    batch = model.prepare_batch(pipeline.collate([source[i] for i in range(num)]))
    colors = np.asarray([[COLORS.index(w) for w in str(t).split() if w in COLORS][-1] for t in batch["instruction"]])
    cond = model.encode_images(state, jnp.asarray(batch["source_image"]))  # [N, h, w]
    target = model.encode_images(state, jnp.asarray(batch["target_image"]))
    mask = jnp.asarray(batch["text_mask"])
    hidden, pooled = model.encode_text(params, jnp.asarray(batch["text_ids"]), mask)
    tokens = jnp.full(cond.shape, model.mgt.mask_token_id)
    _, captured = model.mgt.apply({"params": params["mgt"]}, tokens, hidden, mask, pooled, jnp.ones((num,)),
                                  model.micro_conds(num), cond_tokens=cond, code_features=model.code_features(state),
                                  capture_intermediates=True, mutable=["intermediates"])  # fmt: skip
    captured = captured["intermediates"]
    height = cond.shape[1]
    activations = {}
    for name in sorted(captured):
        if name.startswith("text_cross_blocks"):
            update = np.asarray(captured[name]["__call__"][0][0])  # [N, g, D]
            grid = int(round(np.sqrt(update.shape[1])))
            factor = height // grid
            update = update.reshape(num, grid, grid, -1).repeat(factor, axis=1).repeat(factor, axis=2)
            activations[f"{name}_update"] = update  # [N, h, w, D]
    if "up_block" in captured:
        activations["up_block"] = np.asarray(captured["up_block"]["__call__"][0])
        if "source_skip_proj" in captured:
            activations["head_input"] = activations["up_block"] + np.asarray(
                captured["source_skip_proj"]["__call__"][0]
            )
    changed = np.asarray(target != cond)  # [N, h, w]
    rows = np.nonzero(changed)[0]
    return {name: value[changed].astype(np.float64) for name, value in activations.items()}, colors[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num_train", type=int, default=400)
    parser.add_argument("--num_test", type=int, default=200)
    args = parser.parse_args()

    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    if editor.is_flow:
        raise SystemExit("mgt_hidden_probe.py needs an EditMGT run")
    train_x, train_y = recolored_activations(editor, "train", args.num_train)
    test_x, test_y = recolored_activations(editor, "test", args.num_test)
    report = {
        "command": f"python benchmarks/mgt_hidden_probe.py --checkpoint {args.checkpoint} --num_train "
        f"{args.num_train} --num_test {args.num_test}",
        "step": editor.step,
        "tokens": {"train": len(train_y), "test": len(test_y)},
        "target_color": {
            name: {
                "accuracy": _ridge_accuracy(train_x[name], train_y, test_x[name], test_y),
                "variance_share": _variance_share(train_x[name], train_y),
            }
            for name in train_x
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
