"""Does a trained text encoder still tell the new color apart? Relative state differences between instructions that
differ only in the target color.

  python benchmarks/text_color_probe.py --runs workdir/mgt_tcag_long workdir/mgt_quick_tcag [--fresh]

For every world color c as referent and every other color x as target, "make the c circle x" is encoded; for each
pair of targets (x, y) the script reports ||h_x - h_y|| / ||h_x|| at the target word, at "circle", and for the pooled
embedding, averaged over pairs and referents. Values near 0 mean the readers (MGT / flow DiT) cannot know which color
to draw. `--fresh` also reports each run's text encoder at initialization (same config, seed 0).

`role` decodes the color words' roles from the world's color-edit instructions (all templates; 1,500 `train`
instructions fit, 500 `test` instructions scored): the accuracy of a ridge classifier (standardized features) for
the new color ('target') and the named object's color ('referent') from the pooled embedding and from the mean
state, and the share of the raw features' variance that each color's class means explain ('variance_target',
'variance_referent'). "make the red circle blue" and "make the blue circle red" have the same words; only the
encoder's contextual features tell the two roles apart.
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


def _color_instructions(split: str, num: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """World color-edit instructions of `split` with their referent and target color indices `[num]` each."""
    from editing_jax.data import pipeline
    from editing_jax.data.world import edits

    source = pipeline.WorldSource(split, num, 0, edits.WorldConfig(size=32, edit_types=("color",)))
    texts = [str(source[i]["instruction"]) for i in range(num)]
    colors = [[COLORS.index(w) for w in text.split() if w in COLORS] for text in texts]
    return texts, np.asarray([c[0] for c in colors]), np.asarray([c[-1] for c in colors])


def _ridge_accuracy(train_x, train_y, test_x, test_y, penalty: float = 1e-2) -> float:
    """Accuracy of a one-vs-all ridge classifier on standardized features."""
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-8
    train_x, test_x = (train_x - mean) / scale, (test_x - mean) / scale
    onehot = np.eye(len(COLORS))[train_y]
    gram = train_x.T @ train_x + penalty * len(train_x) * np.eye(train_x.shape[1])
    weights = np.linalg.solve(gram, train_x.T @ onehot)
    return float(np.mean(np.argmax(test_x @ weights, axis=1) == test_y))


def _variance_share(features: np.ndarray, labels: np.ndarray) -> float:
    """Share of the features' total variance explained by the class means of `labels`."""
    centered = features - features.mean(0)
    means = np.stack([centered[labels == c].mean(0) for c in range(len(COLORS))])
    return float(np.sum(means[labels] ** 2) / np.sum(centered**2))


def role(tokenizer, encoder, variables) -> dict[str, dict[str, float]]:
    """Role decoding from the pooled embedding and the mean state (see the module docstring)."""
    features, labels = {}, {}
    for split, num in (("train", 1500), ("test", 500)):
        texts, referent, target = _color_instructions(split, num)
        encoded = tokenizer.encode(texts, None)
        hidden, pooled = encoder.apply(variables, jnp.asarray(encoded["ids"]), jnp.asarray(encoded["mask"]))
        mask = np.asarray(encoded["mask"], np.float64)[..., None]  # [N, L, 1]
        mean = np.sum(np.asarray(hidden, np.float64) * mask, axis=1) / mask.sum(1)
        features[split] = {"pooled": np.asarray(pooled, np.float64), "mean_state": mean}
        labels[split] = {"target": target, "referent": referent}
    result = {}
    for name in ("pooled", "mean_state"):
        train_x, test_x = features["train"][name], features["test"][name]
        result[name] = {}
        for which in ("target", "referent"):
            train_y, test_y = labels["train"][which], labels["test"][which]
            result[name][which] = _ridge_accuracy(train_x, train_y, test_x, test_y)
            result[name][f"variance_{which}"] = _variance_share(train_x, train_y)
    return result


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
        trained = {"params": params["text_encoder"]}
        row["trained"] = probe(model.text_tokenizer, encoder, trained)
        row["trained_role"] = role(model.text_tokenizer, encoder, trained)
        if args.fresh:
            ids = jnp.zeros((1, encoder.max_length), jnp.int32)
            fresh = encoder.init(jax.random.key(0), ids, jnp.ones((1, encoder.max_length), bool))
            row["fresh"] = probe(model.text_tokenizer, encoder, fresh)
            row["fresh_role"] = role(model.text_tokenizer, encoder, fresh)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
