"""Does an EditMGT run read its text? Prediction change when the text's target color is swapped.

  python benchmarks/text_sensitivity.py --checkpoint workdir/editmgt32 --num 64

On `--num` color edits of a split, the MGT predicts every token from an all-masked start (masking rate 1, as the
first sampling step) twice: with the instruction (edit stage) or the target caption (t2i stage), and with its last
color word replaced by another color. Reported: the mean total-variation distance between the two predicted token
distributions, over tokens that the edit changes and over the others (edit stage; t2i: over tokens that differ from
the background-only image), and the accuracy of the argmax on changed tokens. A model that reads its text moves its
prediction where the color matters (TV near 1 when it is confident); one that ignores the text gives TV near 0.
Also reported: the attention mass image queries put on text keys, per layer and head (all-masked start).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")


def swap_last_color(text: str, shift: int = 3) -> str:
    """Replaces the last color word of `text` with the color `shift` places later in COLORS."""
    words = text.split()
    positions = [i for i, word in enumerate(words) if word in COLORS]
    if not positions:
        raise ValueError(f"no color word in {text!r}")
    last = positions[-1]
    words[last] = COLORS[(COLORS.index(words[last]) + shift) % len(COLORS)]
    return " ".join(words)


def measure(checkpoint: str, split: str, num: int) -> dict:
    import jax
    import jax.numpy as jnp

    from editing_jax import inference
    from editing_jax.data.world import edits

    editor = inference.load_editor(checkpoint)
    if editor.is_flow:
        raise SystemExit("text_sensitivity measures EditMGT runs")
    model, params, state = editor.model, editor.params, editor.model_state
    world = edits.WorldConfig(size=model.image_size, edit_types=("color",))
    samples = [edits.generate_sample(split, int(editor.config.data.seed), i, world) for i in range(num)]
    stage = model.stage
    texts = [s.edit.instruction if stage == "edit" else s.edit.target.caption() for s in samples]
    swapped = [swap_last_color(text) for text in texts]
    source = model.encode_images(state, jnp.asarray(np.stack([s.source_image for s in samples])))  # [N, h, w]
    target = model.encode_images(state, jnp.asarray(np.stack([s.target_image for s in samples])))
    if stage == "edit":
        changed = np.asarray(source != target)
    else:  # t2i: tokens that differ from the most common (background) token of each image
        flat = np.asarray(target).reshape(num, -1)
        background = np.array([np.bincount(row).argmax() for row in flat])
        changed = np.asarray(target) != background[:, None, None]

    layers = tuple(range(model.mgt.num_blocks))

    @jax.jit
    def log_probs(ids, mask):
        hidden, pooled = model.encode_text(params, ids, mask)
        tokens = jnp.full(target.shape, model.mgt.mask_token_id, jnp.int32)
        cond = source if model.uses_condition else None
        logits, probs = model.logits(params, tokens, (hidden, mask, pooled), jnp.ones((num,), jnp.float32), cond,
                                     capture_layers=layers, model_state=state)  # fmt: skip
        text_len = ids.shape[1]
        image_len = (model.token_grid // 2 if model.mgt.downsample else model.token_grid) ** 2
        to_text = jnp.sum(probs[:, :, :, text_len : text_len + image_len, :text_len], axis=-1)  # [N, B, H, g]
        return jax.nn.log_softmax(logits, axis=-1), jnp.mean(to_text, axis=(1, 3))  # [N, H]

    def run(batch_texts):
        encoded = model.text_tokenizer.encode(batch_texts)
        out, to_text = log_probs(jnp.asarray(encoded["ids"]), jnp.asarray(encoded["mask"]))
        return np.exp(np.asarray(out)), np.asarray(to_text)

    (original, to_text), (moved, _) = run(texts), run(swapped)
    tv = 0.5 * np.abs(original - moved).sum(-1)  # [N, h, w]
    correct = original.argmax(-1) == np.asarray(target)
    return {
        "checkpoint": checkpoint,
        "step": editor.step,
        "stage": stage,
        "num_examples": num,
        "tv_changed_tokens": float(tv[changed].mean()),
        "tv_other_tokens": float(tv[~changed].mean()),
        "argmax_accuracy_changed_tokens": float(correct[changed].mean()),
        "image_to_text_attention_per_layer_and_head": np.round(to_text, 4).tolist(),
        "example": [texts[0], swapped[0]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--num", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(measure(args.checkpoint, args.split, args.num)))


if __name__ == "__main__":
    main()
