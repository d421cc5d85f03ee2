"""Which verifier checks an editor fails, per edit type: the edit itself or the objects it should have kept.

  python benchmarks/failure_breakdown.py --checkpoint workdir/mgt_long --split test --num 128 [--steps 1 \
      --token_temperature 0] [--code_coverage]

For every edit type: examples, successes, incoherent outputs, and how many target objects fail each attribute check
('present', 'kind', 'color', 'size', 'style'), split into the *edited* object (the cell the edit names) and the *other*
objects (those the edit should leave alone), and what the output holds in each wrong edited cell (`edited_missing`: no
object; `edited_unchanged`: the source's object, the edit not applied; `edited_changed_wrongly`: another object). Works
for EditMGT and flow-editor runs (plain sampling, no region hold). EditMGT rows also get `attention_auroc`: how well the
consolidated text->image attention map separates the edit mask's tokens from the rest (the chance that a random edited
token scores above a random kept one; 0.5 = no localization), averaged over examples whose edit mask is neither empty
nor everything. `changed_pixel_colors`: on the pixels the edit changes (source vs target), the share whose output color
(nearest world object or background color) is the target's ('target'), the source's ('source'), a background color or
another object color: whether an editor draws the instruction's new color, keeps the old one or erases.
`--code_coverage` (VQ editors) also counts how often each code occurs in 4,096 train pairs and reports the share of
`--split` tokens whose code is rare in train.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib

import numpy as np

from editing_jax.data.world.edits import SPLITS

ATTRIBUTES = ("present", "kind", "color", "size", "style")


def edited_cells(source_scene, target_scene) -> set[str]:
    """Cells whose object differs between source and target (added, removed, moved or changed)."""
    source = {o.cell: o for o in source_scene.objects}
    target = {o.cell: o for o in target_scene.objects}
    return {cell for cell in set(source) | set(target) if source.get(cell) != target.get(cell)}


def edited_object_outcome(output_object, source_object) -> str:
    """What a wrong edited cell holds: 'missing', 'unchanged' (the source's object) or 'changed_wrongly'."""
    if output_object is None:
        return "missing"
    return "unchanged" if output_object == source_object else "changed_wrongly"


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


@functools.cache
def _palette() -> tuple[np.ndarray, int]:
    """`[K, 3]` world colors (object colors first, then each background's first color) and the object count."""
    from editing_jax.data.world import spec

    objects = [spec.OBJECT_COLORS[c] for c in spec.COLORS]
    backgrounds = [spec.BACKGROUND_COLORS[b][0] for b in spec.BACKGROUNDS]
    return np.asarray(objects + backgrounds, np.float32), len(objects)


def changed_pixel_colors(source: np.ndarray, target: np.ndarray, output: np.ndarray) -> collections.Counter:
    """Counts of the changed pixels (summed |source - target| > 60 of 765) of uint8 `[S, S, 3]` images by what
    color the output has there: 'target', 'source', 'background' (another background color) or 'other_object'."""
    palette, num_objects = _palette()

    def nearest(image: np.ndarray) -> np.ndarray:
        return np.argmin(((image.astype(np.float32)[..., None, :] - palette) ** 2).sum(-1), axis=-1)  # [S, S]

    changed = np.abs(source.astype(np.int32) - target.astype(np.int32)).sum(-1) > 60
    got, wanted, was = nearest(output)[changed], nearest(target)[changed], nearest(source)[changed]
    counts = collections.Counter()
    counts["target"] = int((got == wanted).sum())
    counts["source"] = int(((got != wanted) & (got == was)).sum())
    rest = (got != wanted) & (got != was)
    counts["background"] = int((rest & (got >= num_objects)).sum())
    counts["other_object"] = int((rest & (got < num_objects)).sum())
    return counts


def breakdown(editor, split: str, num: int, settings, batch_size: int = 64) -> dict:
    from editing_jax import inference
    from editing_jax.data.world import spec, verifier
    from editing_jax.methods import editmgt

    edit_fn = editor.edit_fn(settings)
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for index, raw in enumerate(inference.world_split_batches(editor, split, num, batch_size)):
        batch = editor.model.prepare_batch(raw)
        out = editmgt.run_edits(edit_fn, editor.params, editor.model_state, batch, settings, seed=index,
                                region_hold_threshold=0.0)  # fmt: skip
        targets = [spec.Scene.from_json(str(s)) for s in raw["target_scene"]]
        sources = [spec.Scene.from_json(str(s)) for s in raw["source_scene"]]
        result = verifier.verify(out["images"], targets)
        for i, edit_type in enumerate(str(t) for t in raw["edit_type"]):
            row = rows[edit_type]
            row["examples"] += 1
            row["success"] += int(result.success[i])
            row["incoherent"] += int(not result.coherent[i])
            changed = edited_cells(sources[i], targets[i])
            failed_cells: dict[str, list[str]] = collections.defaultdict(list)
            for key, ok in result.attributes[i].items():
                cell, _, attribute = key.partition(".")
                if ok:
                    continue
                if attribute in ATTRIBUTES:
                    failed_cells[cell].append(attribute)
                else:
                    row[key] += 1  # background, no_extra_objects and the count checks
            output_objects = {o.cell: o for o in result.parsed[i].objects}
            source_objects = {o.cell: o for o in sources[i].objects}
            for cell, attributes in failed_cells.items():
                group = "edited" if cell in changed else "other"
                row[f"{group}_objects_wrong"] += 1
                if group == "edited":
                    outcome = edited_object_outcome(output_objects.get(cell), source_objects.get(cell))
                    row[f"edited_{outcome}"] += 1
                for attribute in attributes:
                    row[f"{group}.{attribute}"] += 1
            row["other_objects"] += sum(1 for o in targets[i].objects if o.cell not in changed)
            pixels = changed_pixel_colors(raw["source_image"][i], raw["target_image"][i], out["images"][i])
            for key, count in pixels.items():
                row[f"changed_pixels_{key}"] += count
            if "attention" in out:
                grid = out["attention"].shape[1]
                mask = np.asarray(raw["edit_mask"][i], bool)  # [S, S]
                block = mask.shape[0] // grid
                mask_tokens = mask.reshape(grid, block, grid, block).any(axis=(1, 3))  # [h, w]
                if 0 < mask_tokens.sum() < mask_tokens.size:
                    row["attention_auroc_sum"] += auroc(np.asarray(out["attention"][i]), mask_tokens)
                    row["attention_auroc_examples"] += 1
    report = {}
    for edit_type, counts in sorted(rows.items()):
        row = dict(counts)
        pixels = {k.removeprefix("changed_pixels_"): row.pop(k) for k in list(row) if k.startswith("changed_pixels_")}
        if sum(pixels.values()):
            row["changed_pixel_colors"] = {k: v / sum(pixels.values()) for k, v in pixels.items()}
        if row.get("attention_auroc_examples"):
            row["attention_auroc"] = row.pop("attention_auroc_sum") / row["attention_auroc_examples"]
        report[edit_type] = row
    return report


def code_coverage(editor, split: str, num: int) -> dict:
    import jax.numpy as jnp

    from editing_jax.data import pipeline
    from editing_jax.data.world import edits

    model, state = editor.model, editor.model_state

    def tokens(name: str, count: int) -> np.ndarray:
        data = pipeline.WorldSource(
            name, count, int(editor.config.data.seed), edits.WorldConfig(size=editor.image_size)
        )
        out = []
        for start in range(0, count, 256):
            batch = model.prepare_batch(pipeline.collate([data[i] for i in range(start, min(count, start + 256))]))
            for key in ("source_image", "target_image"):
                out.append(np.asarray(model.encode_images(state, jnp.asarray(batch[key]))).ravel())
        return np.concatenate(out)

    train = np.bincount(tokens("train", 4096), minlength=model.mgt.codebook_size)
    evaluated = tokens(split, num)
    return {
        "codes_seen_in_train": int((train > 0).sum()),
        "codebook_size": int(model.mgt.codebook_size),
        **{f"{split}_tokens_with_train_count_below_{k}": float((train[evaluated] < k).mean()) for k in (1, 5, 20)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--token_temperature", type=float, default=None)
    parser.add_argument("--code_coverage", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    overrides = {"num_steps": args.steps}
    if not editor.is_flow:
        overrides["token_temperature"] = args.token_temperature
    settings = editor.settings(**overrides)
    report = {
        "command": "python benchmarks/failure_breakdown.py "
        + " ".join(
            f"--{k}" if v is True else f"--{k} {v}"
            for k, v in vars(args).items()
            if v is not None and v is not False and k != "out"
        ),
        "checkpoint_step": editor.step,
        "per_edit_type": breakdown(editor, args.split, args.num, settings),
    }
    if args.code_coverage and not editor.is_flow:
        report["code_coverage"] = code_coverage(editor, args.split, args.num)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    print(
        f"\n| `{args.split}` ({args.num}) | examples | success | incoherent | edited objects wrong | objects to keep "
        "that are wrong | attention AUROC |"
    )
    print("|---|---|---|---|---|---|---|")
    for edit_type, row in report["per_edit_type"].items():
        print(
            f"| {edit_type} | {row['examples']} | {row['success']} | {row.get('incoherent', 0)} | "
            f"{row.get('edited_objects_wrong', 0)} | {row.get('other_objects_wrong', 0)} of {row['other_objects']} | "
            f"{row.get('attention_auroc', float('nan')):.2f} |"
        )


if __name__ == "__main__":
    main()
