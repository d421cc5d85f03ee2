"""EditMGT decoding settings on a trained model: steps, re-masking noise and token temperature.

  python benchmarks/mgt_sampler_settings.py --checkpoint workdir/quickstart/editmgt --num 128

Every row decodes the same `--num` examples of `--split` with the same seeds and differs from the checkpoint's
settings in the named fields only (no region hold). Prints a markdown table of verifier success (overall and per
edit type) and preservation L1; writes benchmarks/results/mgt_sampler_settings.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from editing_jax.data.world.edits import SPLITS

# (name, overrides of SamplingSettings): the checkpoint's defaults first.
VARIANTS = (
    ("default", {}),
    ("24 steps", {"num_steps": 24}),
    ("re-mask noise 0.5", {"temperature": 0.5}),
    ("re-mask noise 0 (pure confidence)", {"temperature": 0.0}),
    ("token temperature 0.5", {"token_temperature": 0.5}),
    ("argmax tokens", {"token_temperature": 0.0}),
    ("argmax tokens, re-mask noise 0", {"token_temperature": 0.0, "temperature": 0.0}),
    ("1 step, argmax (one-shot)", {"num_steps": 1, "token_temperature": 0.0}),
    ("2 steps, argmax, re-mask noise 0", {"num_steps": 2, "token_temperature": 0.0, "temperature": 0.0}),
    ("4 steps, argmax, re-mask noise 0", {"num_steps": 4, "token_temperature": 0.0, "temperature": 0.0}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--only", default="", help="row names to run, separated by ';' (default: every row)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "mgt_sampler_settings.json"))
    args = parser.parse_args()

    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    if editor.is_flow:
        raise SystemExit(f"{args.checkpoint} is a flow editor run; this benchmark is for EditMGT")
    only = {name.strip() for name in args.only.split(";") if name.strip()}
    unknown = only - {name for name, _ in VARIANTS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows are {[name for name, _ in VARIANTS]}")
    rows = {}
    for name, overrides in VARIANTS:
        if only and name not in only:
            continue
        settings = dataclasses.replace(editor.settings(), **overrides)
        result = inference.evaluate_split(
            editor,
            thresholds={"plain": 0.0},
            settings=settings,
            split=args.split,
            num_examples=args.num,
            batch_size=args.batch_size,
            show_progress=True,
        )["results"]["plain"]
        rows[name] = {"overrides": overrides, **result}
        print(f"{name}: {100 * result['verifier_success']:.1f} %", flush=True)

    report = {
        "command": f"python benchmarks/mgt_sampler_settings.py --checkpoint {args.checkpoint} --split {args.split} "
        f"--num {args.num}" + (f" --only '{args.only}'" if args.only else ""),
        "checkpoint_step": editor.step,
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    types = sorted(next(iter(rows.values()))["per_edit_type"])
    print(f"\n| decoding ({args.num} `{args.split}`) | success | L1 | " + " | ".join(types) + " |")
    print("|---" * (3 + len(types)) + "|")
    for name, result in rows.items():
        per_type = " | ".join(f"{100 * result['per_edit_type'][t]['verifier_success']:.0f}" for t in types)
        print(f"| {name} | {100 * result['verifier_success']:.1f} % | {result['preservation_l1']:.4f} | {per_type} |")


if __name__ == "__main__":
    main()
