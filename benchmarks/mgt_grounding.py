"""Does an editor's edit find the object its instruction names? Gate and changed tokens per object role.

  python benchmarks/mgt_grounding.py --checkpoint workdir/quickstart/editmgt --split test --num 256 \
      [--out benchmarks/results/mgt_grounding_RUN.json]

For every object edit the source objects are sorted into the *referent* (the object the edit changes),
*distractors* (kept objects sharing its color or kind, which the world places on purpose) and *unrelated* kept
objects. For each role, over the tokens the object covers (kept objects: outside the edit mask), it reports the mean
of a per-token map in [0, 1] (`<role>_map`) and, for EditMGT, the share of tokens the editor changed
(`<role>_changed`). An editor that grounds the instruction changes the referent and leaves the others; `map_auroc` is
the chance that a random referent token scores above a random kept-object token on the map (0.5: the map does not
tell the named object from the others).

EditMGT (plain one-step decoding, no region hold): the map is the region-hold map (the consolidated text->image
attention or gate). Flow editor (`flow_edit`, needs `model.text_cross_attention`): the map is the last text
cross-attention gate on the target tokens at t = 1, the start of sampling (x_1 a fixed-seed N(0, I) draw; a
source-read gate, `text_cross_source`, is the reference token's and does not depend on it). The flow sampler is not
run, so there is no `<role>_changed`; a flow editor without text cross-attention gets `word_states` only.

`name_swap` asks whether the gate reads the name at all: for every `remove` edit with a second object, the last text
cross-attention gate where the edit starts (EditMGT: all target tokens masked, as the one-step editor runs; flow:
t = 1, both instructions on the same noise) is computed twice, for "remove the <referent>" and for "remove the
<other object>", and averaged over the cells only one of the two objects covers. `named_higher` is the share of pairs
where the gate is higher on the object the instruction names (0.5: it ignores the name; 1.0: it follows it).

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

from editing_jax.data.world.edits import SPLITS

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


def role_token_masks(raw: dict, i: int, grid: int) -> dict[str, list[np.ndarray]]:
    """Example `i` of a raw batch: its source objects by role as `[grid, grid]` bool masks of the tokens each covers.

    Referents count inside the edit mask, kept objects outside it; an object left with no token is dropped.
    """
    from editing_jax.data.world import render, spec

    roles = object_roles(spec.Scene.from_json(str(raw["source_scene"][i])),
                         spec.Scene.from_json(str(raw["target_scene"][i])))  # fmt: skip
    edited = token_mask(np.asarray(raw["edit_mask"][i], bool), grid)  # [h, w]
    size = raw["source_image"].shape[1]
    masks = {}
    for role, objects in roles.items():
        inside = edited if role == "referent" else ~edited
        covered = (token_mask(render.object_coverage(size, obj) > 0.2, grid) & inside for obj in objects)
        masks[role] = [tokens for tokens in covered if tokens.any()]
    return masks


class RoleStats:
    """Per-role token statistics of object edits, shared by both editors.

    Per edit type: the mean of a token map (and of the changed tokens) over each role's objects, and the map's AUROC
    referent vs kept tokens.
    """

    def __init__(self):
        self.means = collections.defaultdict(lambda: collections.defaultdict(list))
        self.aurocs = collections.defaultdict(list)

    def add_batch(self, raw: dict, maps: np.ndarray, changed: np.ndarray | None = None) -> None:
        """Adds the object edits of a raw batch.

        Args:
            raw: a raw world batch (scenes, edit masks, edit types).
            maps: `[B, grid, grid]` the per-token map in [0, 1].
            changed: optional `[B, grid, grid]` bool, the tokens the editor changed.
        """
        from failure_breakdown import auroc

        grid = maps.shape[1]
        for i, edit_type in enumerate(str(t) for t in raw["edit_type"]):
            if edit_type not in OBJECT_EDITS:
                continue
            masks = role_token_masks(raw, i, grid)
            for role, role_masks in masks.items():
                for tokens in role_masks:
                    self.means[edit_type][f"{role}_map"].append(float(maps[i][tokens].mean()))
                    if changed is not None:
                        self.means[edit_type][f"{role}_changed"].append(float(changed[i][tokens].mean()))
            none = np.zeros((grid, grid), bool)
            referent = np.any([none, *masks["referent"]], axis=0)  # [h, w]
            kept = np.any([none, *masks["distractor"], *masks["unrelated"]], axis=0)  # [h, w]
            if referent.any() and kept.any():
                both = referent | kept  # disjoint: inside vs outside the edit mask
                self.aurocs[edit_type].append(auroc(maps[i][both], referent[both]))

    def report(self) -> dict:
        """{edit type: {'<role>_map' (, '<role>_changed'): {'mean', 'objects'}, 'map_auroc': {'mean', 'examples'}}}."""
        report = {}
        for edit_type in sorted(self.means):
            row = {key: {"mean": float(np.mean(values)), "objects": len(values)}
                   for key, values in self.means[edit_type].items()}  # fmt: skip
            if self.aurocs[edit_type]:
                row["map_auroc"] = {"mean": float(np.mean(self.aurocs[edit_type])),
                                    "examples": len(self.aurocs[edit_type])}  # fmt: skip
            report[edit_type] = row
        return report


def grounding(editor, split: str, num: int, batch_size: int = 64) -> dict:
    """EditMGT: the region-hold map and the changed tokens of a plain one-step edit, per edit type and role."""
    from editing_jax import inference
    from editing_jax.methods import editmgt

    settings = editor.settings()
    edit_fn = editor.edit_fn(settings)
    stats = RoleStats()
    for index, raw in enumerate(inference.world_split_batches(editor, split, num, batch_size)):
        batch = editor.model.prepare_batch(raw)
        out = editmgt.run_edits(edit_fn, editor.params, editor.model_state, batch, settings, seed=index,
                                region_hold_threshold=0.0)  # fmt: skip
        changed = np.asarray(out["tokens"]) != np.asarray(out["source_tokens"])  # [B, h, w]
        stats.add_batch(raw, np.asarray(out["attention"]), changed)
    return stats.report()


def flow_grounding(editor, split: str, num: int, batch_size: int = 64) -> dict:
    """Flow editor: the last text cross-attention gate at t = 1 (no sampling), per edit type and role."""
    from editing_jax import inference

    gate = text_gate_fn(editor)
    stats = RoleStats()
    for index, raw in enumerate(inference.world_split_batches(editor, split, num, batch_size)):
        stats.add_batch(raw, gate(editor.model.prepare_batch(raw), seed=index))
    return stats.report()


def has_text_gate(editor) -> bool:
    """Whether the editor has a text cross-attention (and so a gate)."""
    return editor.model.dit.text_cross_attention if editor.is_flow else editor.model.mgt.text_cross_attention


def flow_gate_fn(model):
    """The flow editor's last text cross-attention gate on the target tokens at t = 1 (the start of sampling), jitted.

    Args:
        model: a `FlowEditor` whose DiT has `text_cross_attention`.

    Returns:
        `gate(params, model_state, text_ids [B, Lt], text_mask [B, Lt], source uint8 [B, S, S, 3], seed)` ->
        `[B, grid, grid]` in [0, 1]. x_1 is one N(0, I) draw `[L, C]` of `jax.random.key(seed)` shared by the rows;
        a source-read gate (`text_cross_source`, sown `[B, Lr]`) does not depend on it.
    """
    import jax
    import jax.numpy as jnp

    grid = model.token_grid
    block = f"text_cross_blocks_{model.dit.num_layers - 1}"

    @jax.jit
    def gate(params, model_state, text_ids, text_mask, source, seed):
        reference = model.encode(model_state, source)  # [B, L, C]
        x_1 = jnp.broadcast_to(jax.random.normal(jax.random.key(seed), reference.shape[1:]), reference.shape)
        text = model.encode_text(params, text_ids, text_mask)
        _, variables = model._apply_dit(params, x_1, jnp.ones(reference.shape[:1]), text, reference,
                                        mutable=["intermediates"])  # fmt: skip
        sown = variables["intermediates"][block]["text_gate"][0]  # [B, L + Lr] (target, reference), or [B, Lr]
        return sown[:, : grid * grid].reshape(-1, grid, grid)

    return gate


def text_gate_fn(editor):
    """`gate(batch, seed=0) -> [B, grid, grid]`: the last text cross-attention gate where an edit starts.

    EditMGT: every target token masked (the one-step editor's input; `seed` is unused). Flow editor: t = 1, see
    `flow_gate_fn`. `batch` is a prepared batch (text ids and mask, uint8 source images).
    """
    import jax.numpy as jnp

    model = editor.model
    if editor.is_flow:
        flow_gate = flow_gate_fn(model)

        def gate(batch: dict, seed: int = 0) -> np.ndarray:
            inputs = (jnp.asarray(batch[key]) for key in ("text_ids", "text_mask", "source_image"))
            return np.asarray(flow_gate(editor.params, editor.model_state, *inputs, seed))

        return gate
    gate_name = f"text_cross_blocks_{model.mgt.num_text_cross_blocks - 1}/text_gate"

    def gate(batch: dict, seed: int = 0) -> np.ndarray:
        del seed
        text_mask = jnp.asarray(batch["text_mask"])
        hidden, pooled = model.encode_text(editor.params, jnp.asarray(batch["text_ids"]), text_mask)
        cond = model.encode_images(editor.model_state, jnp.asarray(batch["source_image"]))
        masked = jnp.full_like(cond, model.mgt.mask_token_id)
        _, _, sown = model.logits(editor.params, masked, (hidden, text_mask, pooled), jnp.ones((len(cond),)), cond,
                                  model_state=editor.model_state, sown=(gate_name,))  # fmt: skip
        values = np.asarray(sown[gate_name])  # [B, g]
        grid = int(round(np.sqrt(values.shape[1])))
        return values.reshape(len(values), grid, grid)

    return gate


def name_swap(editor, split: str, num: int, batch_size: int = 64) -> dict:
    from editing_jax import inference
    from editing_jax.data.world import render, spec

    model = editor.model
    gate_of = text_gate_fn(editor)
    pairs = []  # [gate on the referent, on the other] when naming the referent, then when naming the other
    for index, raw in enumerate(inference.world_split_batches(editor, split, num, batch_size)):
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
            gate = gate_of(batch, seed=index * batch_size + i)  # [2, g, g]; flow: both rows on the same noise
            grid = gate.shape[1]
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
    text = model.encode_text(editor.params, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]))
    hidden = np.asarray(text[0])  # [N, Lt, D]; words: remove, the, color, kind (EditMGT and flow: hidden first)
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
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    report = {
        "command": f"python benchmarks/mgt_grounding.py --checkpoint {args.checkpoint} --split {args.split} "
        f"--num {args.num}",
        "checkpoint_step": editor.step,
    }
    if not editor.is_flow:
        report["per_edit_type"] = grounding(editor, args.split, args.num)
    elif has_text_gate(editor):
        report["per_edit_type"] = flow_grounding(editor, args.split, args.num)
    if has_text_gate(editor):
        report["name_swap"] = name_swap(editor, args.split, args.num)
    report["word_states"] = word_states(editor)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    print("\n| edit | role | map | tokens changed | objects |\n|---|---|---|---|---|")
    for edit_type, row in report.get("per_edit_type", {}).items():
        for role in ROLES:
            if f"{role}_map" in row:
                changed = f"{row[f'{role}_changed']['mean']:.2f}" if f"{role}_changed" in row else "-"
                print(f"| {edit_type} | {role} | {row[f'{role}_map']['mean']:.2f} | {changed} | "
                      f"{row[f'{role}_map']['objects']} |")  # fmt: skip
        if "map_auroc" in row:
            print(f"| {edit_type} | map AUROC referent vs kept | {row['map_auroc']['mean']:.2f} | | |")
    if "name_swap" in report:
        print(f"\nname swap (remove): {json.dumps(report['name_swap'])}")
    print(f"word states: {json.dumps(report['word_states'])}")


if __name__ == "__main__":
    main()
