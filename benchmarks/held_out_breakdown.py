"""Success by the role of the held-out composition and by the number of objects in the scene.

  python benchmarks/held_out_breakdown.py benchmarks/results/RUN_val1024.json benchmarks/results/RUN_test1024.json \
      [--world_seed 0] [--setting plain] [--mix_of benchmarks/results/RUN_test1024.json] [--out FILE.json]

Every `test` example holds at least one (color, kind) composition that train and val never contain
(`spec.HELD_OUT_COMPOSITIONS`). This script regenerates each example of an `editing-jax eval` JSON (in split order,
from the world seed) and puts it in one role, the first that applies:

- `draws`: the edit creates a held-out composition (an edited object in the target has one that no edited object in
  the source had: a recolor, replace or add that makes, say, a red triangle);
- `edits`: an object the edit acts on has a held-out composition in the source (the instruction names it);
- `keeps`: the held-out composition is only on objects the edit leaves alone (they must be copied).

It reports success per role, overall and per edit type (test reports only), and per number of objects in the source
scene (any split). The test split's rejection sampling favours crowded scenes (a scene with more objects more often
holds a held-out composition), so its object-count mix differs from train and val; `--mix_of REPORT` also gives each
report's success reweighted to REPORT's object-count mix (the mean over counts of the success at that count, weighted
by REPORT's share of that count), which separates the harder mix from the held-out compositions. Works for any eval
JSON with `per_example_success` and `per_example_edit_type` (EditMGT and the flow editor).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

ROLES = ("draws", "edits", "keeps")


def held_out_role(edit, held_out: set[tuple[str, str]]) -> str:
    """The role of the held-out composition in `edit` (`edits.Edit`): 'draws', 'edits', 'keeps', or 'none'."""
    before = {o.composition for o in edit.edited_source}
    if any(o.composition in held_out and o.composition not in before for o in edit.edited_target):
        return "draws"
    if before & held_out:
        return "edits"
    edited = set(edit.edited_source) | set(edit.edited_target)
    others = [o for scene in (edit.source, edit.target) for o in scene.objects if o not in edited]
    return "keeps" if any(o.composition in held_out for o in others) else "none"


def breakdown(report: dict, world_seed: int, setting: str = "plain") -> dict:
    """Counts of one `editing-jax eval` report: {'roles': {type: {role: {examples, success}}} (test only; 'all' is
    every type), 'objects': {count: {examples, success}}} with `count` the source scene's number of objects."""
    from editing_jax.data.world import edits, spec

    split = report.get("split")
    if split not in edits.SPLITS:
        raise ValueError(f"the report has no world split (got {split!r})")
    results = report["results"][setting]
    success, types = results["per_example_success"], results["per_example_edit_type"]
    held_out = set(spec.HELD_OUT_COMPOSITIONS)
    roles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    objects: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for index, (solved, edit_type) in enumerate(zip(success, types, strict=True)):
        edit = edits.generate_edit(split, world_seed, index)
        if edit.edit_type != edit_type:
            raise ValueError(f"example {index} is a {edit.edit_type} edit in world seed {world_seed}, the report says "
                             f"{edit_type}: wrong --world_seed?")  # fmt: skip
        count = objects[len(edit.source.objects)]
        count["examples"] += 1
        count["success"] += int(solved)
        if split == "test":
            role = held_out_role(edit, held_out)
            for key in ("all", edit_type):
                roles[key][role] += 1
                roles[key][role + "_success"] += int(solved)
    return {
        "split": split,
        "roles": {
            key: {
                role: {"examples": counts[role], "success": counts[role + "_success"]}
                for role in (*ROLES, "none")
                if counts[role]
            }
            for key, counts in sorted(roles.items())
        },
        "objects": {n: dict(objects[n]) for n in sorted(objects)},
    }


def reweighted_success(objects: dict, mix: dict) -> float:
    """Success of per-object-count counts `objects` reweighted to the object-count shares of `mix` (same format)."""
    total = sum(row["examples"] for row in mix.values())
    missing = [n for n, row in mix.items() if row["examples"] and not objects.get(n, {}).get("examples")]
    if missing:
        raise ValueError(f"no examples with {missing} objects to reweight")
    return sum(row["examples"] / total * objects[n]["success"] / objects[n]["examples"] for n, row in mix.items())


def _cell(row: dict | None) -> str:
    if not row:
        return "-"
    return f"{row['success']}/{row['examples']} {100 * row['success'] / row['examples']:5.1f} %"


def format_table(name: str, table: dict) -> str:
    lines = [f"{name} ({table['split']})", "objects:  " + "   ".join(
        f"{n}: {_cell(row)}" for n, row in table["objects"].items())]  # fmt: skip
    if table["roles"]:
        lines.append(f"{'':12s}" + "".join(f"{role:>18s}" for role in ROLES))
        for key, row in table["roles"].items():
            lines.append(f"{key:12s}" + "".join(f"{_cell(row.get(role)):>18s}" for role in ROLES))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=pathlib.Path, help="editing-jax eval JSON files")
    parser.add_argument("--world_seed", type=int, default=0, help="the checkpoint's config.data.seed")
    parser.add_argument("--setting", default="plain", help="which result of the reports: plain or hold")
    parser.add_argument("--mix_of", type=pathlib.Path, help="also reweight every report to this report's object mix")
    parser.add_argument("--out", type=pathlib.Path, help="write all tables as JSON here")
    args = parser.parse_args()
    tables = {}
    for path in args.reports:
        tables[str(path)] = breakdown(json.loads(path.read_text()), args.world_seed, args.setting)
        print(format_table(str(path), tables[str(path)]), end="\n\n")
    if args.mix_of:
        mix_table = tables.get(str(args.mix_of)) or breakdown(json.loads(args.mix_of.read_text()), args.world_seed,
                                                              args.setting)  # fmt: skip
        mix = mix_table["objects"]
        for name, table in tables.items():
            table["success_at_mix_of"] = {
                "mix_of": str(args.mix_of),
                "success": reweighted_success(table["objects"], mix),
            }
            print(f"{name}: {100 * table['success_at_mix_of']['success']:.1f} % at the object mix of {args.mix_of}")
    if args.out:
        args.out.write_text(json.dumps(tables, indent=1) + "\n")


if __name__ == "__main__":
    main()
