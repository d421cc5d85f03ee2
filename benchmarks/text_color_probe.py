"""Does a trained text encoder still tell the new color apart? Relative state differences between instructions that
differ only in the target color.

  python benchmarks/text_color_probe.py --runs workdir/mgt_tcag_long workdir/mgt_quick_tcag [--fresh]

For every world color c as referent and every other color x as target, "make the c circle x" is encoded; for each
pair of targets (x, y) the script reports ||h_x - h_y|| / ||h_x|| at the target word, at "circle", and for the pooled
embedding, averaged over pairs and referents. Values near 0 mean the readers (MGT / flow DiT) cannot know which color
to draw. `--fresh` also reports each run's text encoder at initialization (same config, seed 0).
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")


def probe(tokenizer, encoder, variables) -> dict[str, float]:
    """Mean relative differences at the target word, at the kind word and of the pooled embedding."""
    target_word, kind_word, pooled_diff = [], [], []
    for referent in COLORS:
        targets = [c for c in COLORS if c != referent]
        encoded = tokenizer.encode([f"make the {referent} circle {c}" for c in targets], None)
        hidden, pooled = encoder.apply(variables, jnp.asarray(encoded["ids"]), jnp.asarray(encoded["mask"]))
        hidden, pooled = np.asarray(hidden, np.float64), np.asarray(pooled, np.float64)
        for i, j in itertools.combinations(range(len(targets)), 2):
            target_word.append(np.linalg.norm(hidden[i, 4] - hidden[j, 4]) / np.linalg.norm(hidden[i, 4]))
            kind_word.append(np.linalg.norm(hidden[i, 3] - hidden[j, 3]) / np.linalg.norm(hidden[i, 3]))
            pooled_diff.append(np.linalg.norm(pooled[i] - pooled[j]) / np.linalg.norm(pooled[i]))
    return {
        "target_word": float(np.mean(target_word)),
        "target_word_min": float(np.min(target_word)),
        "kind_word": float(np.mean(kind_word)),
        "pooled": float(np.mean(pooled_diff)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--fresh", action="store_true", help="also probe each run's text encoder at initialization")
    args = parser.parse_args()

    from editing_jax import inference

    for run in args.runs:
        editor = inference.load_editor(run)
        model, params = editor.model, editor.params
        row = {"run": run, "step": editor.step, "word_skip": bool(model.text_encoder.word_skip)}
        # The EditMGT and flow editors both keep their TextEncoder's params under 'text_encoder'.
        encoder = model.text_encoder
        row["trained"] = probe(model.text_tokenizer, encoder, {"params": params["text_encoder"]})
        if args.fresh:
            ids = jnp.zeros((1, encoder.max_length), jnp.int32)
            fresh = encoder.init(jax.random.key(0), ids, jnp.ones((1, encoder.max_length), bool))
            row["fresh"] = probe(model.text_tokenizer, encoder, fresh)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
