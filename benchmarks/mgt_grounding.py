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

`name_swap` asks whether the gate reads the name at all: for every `remove` edit with a second object, the last text
cross-attention gate (all target tokens masked, as the one-step editor runs) is computed twice, for "remove the
<referent>" and for "remove the <other object>", and averaged over the cells only one of the two objects covers.
`named_higher` is the share of pairs where the gate is higher on the object the instruction names (0.5: it ignores
the name; 1.0: it follows it).

`word_states`: how far apart the text encoder keeps the words a name is made of. For "remove the <color> <kind>"
over all colors and kinds, the mean absolute difference of the encoder's states at the color word's position between
two instructions that differ only in the color, at the kind word's position between two that differ only in the
kind, both relative to the states' mean absolute value (0: the encoder merged those words).
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
    from editing_jax.methods import editmgt

    return np.asarray(editmgt.cells_with_any(np.asarray(pixels)[None], grid)).reshape(grid, grid) > 0


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
    from failure_breakdown import auroc

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
            referent_tokens, kept_tokens = np.zeros_like(edited), np.zeros_like(edited)
            for role, objects in roles.items():
                for obj in objects:
                    tokens = token_mask(render.object_coverage(size, obj) > 0.2, grid)
                    tokens = tokens & edited if role == "referent" else tokens & ~edited
                    if not tokens.any():
                        continue
                    if role == "referent":
                        referent_tokens |= tokens
                    else:
                        kept_tokens |= tokens
                    sums[edit_type][f"{role}_map"].append(float(scores[tokens].mean()))
                    sums[edit_type][f"{role}_changed"].append(float(changed[tokens].mean()))
            if referent_tokens.any() and kept_tokens.any():
                both = referent_tokens | kept_tokens  # disjoint: inside vs outside the edit mask
                auroc_scores[edit_type].append(auroc(scores[both], referent_tokens[both]))
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


def name_swap(editor, split: str, num: int, batch_size: int = 64) -> dict:
    import jax.numpy as jnp

    from editing_jax import inference
    from editing_jax.data.world import render, spec

    model = editor.model
    gate_name = f"text_cross_blocks_{model.mgt.num_text_cross_blocks - 1}/text_gate"
    pairs = []  # [gate on the referent, on the other] when naming the referent, then when naming the other
    for raw in inference.world_split_batches(editor, split, num, batch_size):
        for i in (i for i, t in enumerate(raw["edit_type"]) if str(t) == "remove"):
            roles = object_roles(spec.Scene.from_json(str(raw["source_scene"][i])),
                                 spec.Scene.from_json(str(raw["target_scene"][i])))  # fmt: skip
            others = roles["distractor"] + roles["unrelated"]
            if not others:
                continue
            referent, other = roles["referent"][0], others[0]
            batch = model.prepare_batch({
                "instruction": np.asarray([f"remove the {referent.name}", f"remove the {other.name}"], object),
                "source_image": np.stack([raw["source_image"][i]] * 2),
            })  # fmt: skip
            text_mask = jnp.asarray(batch["text_mask"])
            hidden, pooled = model.encode_text(editor.params, jnp.asarray(batch["text_ids"]), text_mask)
            cond = model.encode_images(editor.model_state, jnp.asarray(batch["source_image"]))
            masked = jnp.full_like(cond, model.mgt.mask_token_id)
            _, _, sown = model.logits(editor.params, masked, (hidden, text_mask, pooled), jnp.ones((2,)), cond,
                                      model_state=editor.model_state, sown=(gate_name,))  # fmt: skip
            gate = np.asarray(sown[gate_name])  # [2, g]
            grid = int(round(np.sqrt(gate.shape[1])))
            gate = gate.reshape(2, grid, grid)
            size = raw["source_image"].shape[1]
            cells = [token_mask(render.object_coverage(size, o) > 0.2, grid) for o in (referent, other)]
            only = [cells[0] & ~cells[1], cells[1] & ~cells[0]]
            if only[0].any() and only[1].any():
                pairs.append([gate[0][only[0]].mean(), gate[0][only[1]].mean(), gate[1][only[0]].mean(),
                              gate[1][only[1]].mean()])  # fmt: skip
    if not pairs:
        return {"pairs": 0}
    pairs = np.asarray(pairs)
    return {
        "pairs": len(pairs),
        "naming_referent": {"gate_referent": float(pairs[:, 0].mean()), "gate_other": float(pairs[:, 1].mean())},
        "naming_other": {"gate_referent": float(pairs[:, 2].mean()), "gate_other": float(pairs[:, 3].mean())},
        "named_higher": float(np.concatenate([pairs[:, 0] > pairs[:, 1], pairs[:, 3] > pairs[:, 2]]).mean()),
    }


def word_states(editor) -> dict:
    import itertools

    import jax.numpy as jnp

    from editing_jax.data.world import spec

    model = editor.model
    names = [(color, kind) for color in spec.COLORS for kind in spec.KINDS]
    batch = model.prepare_batch({"instruction": np.asarray([f"remove the {c} {k}" for c, k in names], object)})
    hidden, _ = model.encode_text(editor.params, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]))
    hidden = np.asarray(hidden)  # [N, Lt, D]; words: remove, the, color, kind
    scale = float(np.abs(hidden[:, :4]).mean())
    color_diffs, kind_diffs = [], []
    for (a, (ca, ka)), (b, (cb, kb)) in itertools.combinations(enumerate(names), 2):
        if ka == kb:
            color_diffs.append(np.abs(hidden[a, 2] - hidden[b, 2]).mean())
        if ca == cb:
            kind_diffs.append(np.abs(hidden[a, 3] - hidden[b, 3]).mean())
    return {"color_word": float(np.mean(color_diffs)) / scale, "kind_word": float(np.mean(kind_diffs)) / scale}


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
    if editor.model.mgt.text_cross_attention:
        report["name_swap"] = name_swap(editor, args.split, args.num)
    report["word_states"] = word_states(editor)
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
    if "name_swap" in report:
        print(f"\nname swap (remove): {json.dumps(report['name_swap'])}")
    print(f"word states: {json.dumps(report['word_states'])}")


if __name__ == "__main__":
    main()
