"""EditMGT masked-token accuracy by masking rate, split into tokens equal to the source (copyable) and changed ones.

  python benchmarks/mgt_token_accuracy.py --checkpoint workdir/editmgt32 --num 64

Diagnoses whether a model has learned to copy unchanged regions (accuracy on 'unchanged' tokens should approach 1)
separately from learning the edits ('changed', also per edit type). For a model with a content head
(`loss.content_weight` > 0) it also reports, on changed tokens per edit type, how often the regressed code vector is
nearer the target token's vector than the source token's ('content_nearer_target') and how often its nearest code
is the target ('content_nearest_code'): whether the hidden state knows the new look even where the logits copy.
'changed_copied_by_edit_type' is how often a changed token is predicted as its source token (the edit not made).
'changed_by_block_kind' splits the changed tokens' accuracy (and copy rate) by whether the target code's pixel block
is uniform (mean per-channel std of its pixels below 2 % of the codebook's range: the inside of a shape) or mixed
(edges, outlines, patterned backgrounds).
For a model with the pixel head (`model.pixel_head`) it reports how often the code nearest the predicted pixels is the
target, on changed tokens per block kind and edit type ('pixel_nearest_code').
For a model with text cross-attention (`model.text_cross_attention`) it reports, per block and edit type, the AUROC
of each image token's text gate (1 - p(null)) against the changed tokens ('text_gate_auroc'; 0.5 = no grounding).
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
from failure_breakdown import auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--edit_types", default="", help="comma-separated edit types to draw (default: all)")
    args = parser.parse_args()

    from editing_jax import inference
    from editing_jax.data import pipeline
    from editing_jax.data.world import edits
    from editing_jax.models.mgt import code_pixel_blocks, standardize_code_features

    editor = inference.load_editor(args.checkpoint)
    model, params, state = editor.model, editor.params, editor.model_state
    world = edits.WorldConfig(size=model.image_size)
    if args.edit_types:
        world = edits.WorldConfig(size=model.image_size, edit_types=tuple(args.edit_types.split(",")))
    source = pipeline.WorldSource("val", args.num, 0, world)
    batch = model.prepare_batch(pipeline.collate([source[i] for i in range(args.num)]))
    target = model.encode_images(state, jnp.asarray(batch["target_image"]))  # [N, h, w]
    cond = model.encode_images(state, jnp.asarray(batch["source_image"]))
    mask = jnp.asarray(batch["text_mask"])
    hidden, pooled = model.encode_text(params, jnp.asarray(batch["text_ids"]), mask)
    changed = np.asarray(target != cond)  # [N, h, w]
    types = np.asarray([str(t) for t in batch["edit_type"]])  # [N]
    codes = np.asarray(standardize_code_features(model.code_features(state))) if model.mgt.content_head else None
    raw_codes = np.asarray(model.code_features(state))  # [V, F]: for the patch VQ, 2x2 pixel blocks (x 3 channels)
    # A code vector is channel-major, [3, 4] (models/mgt.py pixel_channels): spread of each channel over the pixels.
    blocks = np.asarray(code_pixel_blocks(raw_codes, 3))  # [V, N, 3]
    block_spread = blocks.std(axis=1).mean(axis=-1)  # [V]
    uniform_code = block_spread < 0.02 * (raw_codes.max() - raw_codes.min())  # [V]
    uniform_target = uniform_code[np.asarray(target)]  # [N, h, w]

    gates = (
        [f"text_cross_blocks_{i}/text_gate" for i in range(model.mgt.num_text_cross_blocks)]
        if model.mgt.text_cross_attention
        else []
    )
    pixel_head = bool(model.mgt.pixel_channels)
    sown = (("content_prediction",) if codes is not None else ()) + (("pixel_prediction",) if pixel_head else ())
    sown += tuple(gates)
    code_pixels = blocks.reshape(len(raw_codes), -1)  # [V, N*3], pixel-major

    def gate_auroc(gate: np.ndarray) -> dict[str, float]:
        """AUROC of a gate `[N, g]` (upsampled to the token grid) against the changed tokens, per edit type."""
        side = int(round(np.sqrt(gate.shape[1])))
        factor = changed.shape[1] // side
        gate = np.repeat(np.repeat(gate.reshape(-1, side, side), factor, 1), factor, 2)  # [N, h, w]
        result = {}
        for edit_type in sorted(set(types)):
            rows = types == edit_type
            if changed[rows].any() and not changed[rows].all():
                result[edit_type] = auroc(gate[rows].reshape(-1), changed[rows].reshape(-1))
        return result

    def changed_by_edit_type(hit: np.ndarray, masked: np.ndarray) -> dict[str, float]:
        """Mean of `hit` `[N, h, w]` over the masked changed tokens of each edit type."""
        selections = ((t, masked & changed & (types == t)[:, None, None]) for t in sorted(set(types)))
        return {edit_type: float(hit[selected].mean()) for edit_type, selected in selections if selected.any()}

    rows = {}
    for rate in (0.1, 0.5, 0.9, 1.0):
        masked = np.random.default_rng(0).random(target.shape) < rate
        inputs = jnp.where(masked, model.mgt.mask_token_id, target)
        outputs = model.logits(params, inputs, (hidden, mask, pooled), jnp.full((args.num,), rate, jnp.float32),
                               cond if model.uses_condition else None, model_state=state,
                               sown=sown)  # fmt: skip
        predicted_tokens = np.asarray(jnp.argmax(outputs[0], -1))  # [N, h, w]
        correct = predicted_tokens == np.asarray(target)
        copied = predicted_tokens == np.asarray(cond)
        row = rows[str(rate)] = {
            "masked": float(correct[masked].mean()),
            "unchanged": float(correct[masked & ~changed].mean()),
            "changed": float(correct[masked & changed].mean()),
            "changed_by_edit_type": changed_by_edit_type(correct, masked),
            "changed_copied_by_edit_type": changed_by_edit_type(copied, masked),
            "changed_by_block_kind": {
                kind: {
                    "num": int((masked & changed & selected).sum()),
                    "right": changed_by_edit_type(correct, masked & selected),
                    "copied": changed_by_edit_type(copied, masked & selected),
                }
                for kind, selected in (("uniform", uniform_target), ("mixed", ~uniform_target))
            },
        }
        if codes is not None:
            predicted = np.asarray(outputs[2]["content_prediction"])  # [N, h, w, F]
            distances = np.sum((predicted[..., None, :] - codes) ** 2, axis=-1)  # [N, h, w, V]
            to_target = np.take_along_axis(distances, np.asarray(target)[..., None], -1)[..., 0]
            to_source = np.take_along_axis(distances, np.asarray(cond)[..., None], -1)[..., 0]
            row["content_nearer_target"] = changed_by_edit_type(to_target < to_source, masked)
            row["content_nearest_code"] = changed_by_edit_type(distances.argmin(-1) == np.asarray(target), masked)
        if pixel_head:
            predicted = np.asarray(outputs[2]["pixel_prediction"]).reshape(*target.shape, -1)  # [N, h, w, 4*3]
            distances = np.sum((predicted[..., None, :] - code_pixels) ** 2, axis=-1)  # [N, h, w, V]
            nearest = distances.argmin(-1) == np.asarray(target)
            row["pixel_nearest_code"] = {
                kind: changed_by_edit_type(nearest, masked & selected)
                for kind, selected in (("uniform", uniform_target), ("mixed", ~uniform_target))
            }
        if gates:
            row["text_gate_auroc"] = {name.split("/")[0]: gate_auroc(np.asarray(outputs[2][name])) for name in gates}
    command = f"python benchmarks/mgt_token_accuracy.py --checkpoint {args.checkpoint} --num {args.num}"
    if args.edit_types:
        command += f" --edit_types {args.edit_types}"
    print(json.dumps({"command": command, "step": editor.step, "accuracy": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
