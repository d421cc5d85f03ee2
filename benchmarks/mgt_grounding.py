"""Does an EditMGT edit find the object its instruction names? Gate and changed tokens per object role.

  python benchmarks/mgt_grounding.py --checkpoint workdir/quickstart/editmgt --split test --num 256 \
      [--out benchmarks/results/mgt_grounding_RUN.json]

For every object edit (plain one-step decoding, no region hold) the source objects are sorted into the *referent*
(the object the edit changes), *distractors* (kept objects sharing its color or kind, which the world places on
purpose) and *unrelated* kept objects. For each role, over the tokens the object covers (kept objects: outside the
edit mask), it reports the mean region-hold map (the consolidated text->image attention or gate, in [0, 1]) and the
share of tokens the editor changed. An editor that grounds the instruction changes the referent and leaves the
others; `map_auroc` is the chance that a random referent token scores above a random kept-object token on the map
(0.5: the map does not tell the named object from the others).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

import numpy as np

ROLES = ("referent", "distractor", "unrelated")
OBJECT_EDITS = ("color", "replace", "remove", "move", "resize", "style")


def token_mask(pixels: np.ndarray, grid: int) -> np.ndarray:
    """`[S, S]` bool pixels -> `[grid, grid]` bool: tokens holding any of them."""
    factor = pixels.shape[0] // grid
    return pixels.reshape(grid, factor, grid, factor).any(axis=(1, 3))


def object_roles(source_scene, target_scene) -> dict[str, list]:
    """Source objects by role: changed by the edit, kept and sharing the first changed one's color or kind, kept."""
    kept_cells = {o.cell: o for o in target_scene.objects}
    referents = [o for o in source_scene.objects if kept_cells.get(o.cell) != o]
    roles = {role: [] for role in ROLES}
    roles["referent"] = referents
    for obj in source_scene.objects:
        if obj in referents:
            continue
        shares = bool(referents) and (obj.color == referents[0].color or obj.kind == referents[0].kind)
        roles["distractor" if shares else "unrelated"].append(obj)
    return roles


def grounding(editor, split: str, num: int, batch_size: int = 64) -> dict:
    from editing_jax import inference
    from editing_jax.data.world import render, spec
    from editing_jax.methods import editmgt

    settings = editor.settings()
    edit_fn = editor.edit_fn(settings)
    sums: dict[str, collections.defaultdict] = collections.defaultdict(lambda: collections.defaultdict(list))
    auroc_scores: dict[str, list[float]] = collections.defaultdict(list)
    for index, raw in enumerate(inference.world_split_batches(editor, split, num, batch_size)):
        batch = editor.model.prepare_batch(raw)
        out = editmgt.run_edits(edit_fn, editor.params, editor.model_state, batch, settings, seed=index,
                                region_hold_threshold=0.0)  # fmt: skip
        size = raw["source_image"].shape[1]
        grid = out["tokens"].shape[1]
        for i, edit_type in enumerate(str(t) for t in raw["edit_type"]):
            if edit_type not in OBJECT_EDITS:
                continue
            roles = object_roles(spec.Scene.from_json(str(raw["source_scene"][i])),
                                 spec.Scene.from_json(str(raw["target_scene"][i])))  # fmt: skip
            edited = token_mask(np.asarray(raw["edit_mask"][i], bool), grid)  # [h, w]
            changed = out["tokens"][i] != out["source_tokens"][i]  # [h, w]
            scores = np.asarray(out["attention"][i])  # [h, w]
            kept_tokens = np.zeros_like(edited)
            for role, objects in roles.items():
                for obj in objects:
                    tokens = token_mask(render.object_coverage(size, obj) > 0.2, grid)
                    tokens = tokens & edited if role == "referent" else tokens & ~edited
                    if not tokens.any():
                        continue
                    if role != "referent":
                        kept_tokens |= tokens
                    sums[edit_type][f"{role}_map"].append(float(scores[tokens].mean()))
                    sums[edit_type][f"{role}_changed"].append(float(changed[tokens].mean()))
            referent_tokens = edited & token_mask(
                sum((render.object_coverage(size, o) for o in roles["referent"]), np.zeros((size, size))) > 0.2, grid
            )
            if referent_tokens.any() and kept_tokens.any():
                pos, neg = scores[referent_tokens], scores[kept_tokens]
                auroc_scores[edit_type].append(
                    float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
                )
    report = {}
    for edit_type in sorted(sums):
        row = {key: {"mean": float(np.mean(values)), "objects": len(values)} for key, values in sums[edit_type].items()}
        if auroc_scores[edit_type]:
            row["map_auroc"] = {
                "mean": float(np.mean(auroc_scores[edit_type])),
                "examples": len(auroc_scores[edit_type]),
            }
        report[edit_type] = row
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    if editor.is_flow:
        raise SystemExit("mgt_grounding.py reads EditMGT runs (the flow editor has no token map)")
    report = {
        "command": f"python benchmarks/mgt_grounding.py --checkpoint {args.checkpoint} --split {args.split} "
        f"--num {args.num}",
        "checkpoint_step": editor.step,
        "per_edit_type": grounding(editor, args.split, args.num),
    }
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    print("\n| edit | role | map | tokens changed | objects |\n|---|---|---|---|---|")
    for edit_type, row in report["per_edit_type"].items():
        for role in ROLES:
            if f"{role}_map" in row:
                print(f"| {edit_type} | {role} | {row[f'{role}_map']['mean']:.2f} | "
                      f"{row[f'{role}_changed']['mean']:.2f} | {row[f'{role}_map']['objects']} |")  # fmt: skip
        if "map_auroc" in row:
            print(f"| {edit_type} | map AUROC referent vs kept | {row['map_auroc']['mean']:.2f} | | |")


if __name__ == "__main__":
    main()
