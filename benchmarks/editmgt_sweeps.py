"""EditMGT sweeps on the held-out split: region-hold threshold lambda, attention filters, condition strength gamma.

  python benchmarks/editmgt_sweeps.py --checkpoint workdir/quickstart/editmgt --num 256 [--steps 12 \
      --token_temperature 1 --map_scaling minmax --attention_source joint --no-paste_source]
  python benchmarks/editmgt_sweeps.py --checkpoint RUN --split val --num 1024 --sweeps lambda \
      --lambdas 0,0.5,0.525,0.55    # choose lambda on val, then `editing-jax eval` on test at it

For each setting: verifier success (overall and per edit type) and mean preservation L1 outside the edit mask, on
the same `--num` examples of `--split` with the same seeds. Writes benchmarks/results/editmgt_sweeps.json (or --out)
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from editing_jax.data.world.edits import SPLITS

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
FILTERS = ("none", "gaussian", "bilateral", "morphological", "adaptive")
GAMMAS = (0.0, 1.0, 1.1, 2.0, 4.0)
SWEEPS = ("lambda", "filter", "gamma")
# (command-line flag, SamplingSettings field) of the decoding overrides.
DECODING_FLAGS = (
    ("steps", "num_steps"),
    ("token_temperature", "token_temperature"),
    ("remask_noise", "temperature"),
    ("map_scaling", "map_scaling"),
    ("attention_source", "attention_source"),
    ("region_hold_threshold", "region_hold_threshold"),  # the filter comparison's lambda
)


def _row(name: str, result: dict) -> str:
    return f"| {name} | {100 * result['verifier_success']:.1f} % | {result['preservation_l1']:.4f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {SWEEPS}")
    parser.add_argument("--lambdas", default=",".join(f"{lam:g}" for lam in LAMBDAS), help="comma-separated")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "editmgt_sweeps.json"))
    # Decoding overrides of the checkpoint's settings (default: the checkpoint's own).
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--token_temperature", type=float, default=None)
    parser.add_argument("--remask_noise", type=float, default=None)
    parser.add_argument("--map_scaling", default=None, choices=("minmax", "max", "none"))
    parser.add_argument("--attention_source", default=None, choices=("joint", "text_cross", "token_change"))
    parser.add_argument("--region_hold_threshold", type=float, default=None)
    parser.add_argument("--paste_source", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    sweeps = [name for name in args.sweeps.split(",") if name]
    if unknown := set(sweeps) - set(SWEEPS):
        parser.error(f"unknown --sweeps {sorted(unknown)}; choose from {SWEEPS}")
    try:
        lambdas_to_run = [float(value) for value in args.lambdas.split(",") if value]
    except ValueError:
        parser.error(f"--lambdas must be comma-separated numbers, got {args.lambdas!r}")
    overrides = {key: getattr(args, flag) for flag, key in DECODING_FLAGS}
    overrides["paste_source"] = args.paste_source
    flags = f" --split {args.split}" if args.split != "test" else ""
    flags += "" if args.sweeps == ",".join(SWEEPS) else f" --sweeps {args.sweeps}"
    flags += "" if "lambda" not in sweeps or lambdas_to_run == list(LAMBDAS) else f" --lambdas {args.lambdas}"
    flags += "".join(
        f" --{flag} {getattr(args, flag)}" for flag, _ in DECODING_FLAGS if getattr(args, flag) is not None
    )
    if args.paste_source is not None:
        flags += " --paste_source" if args.paste_source else " --no-paste_source"

    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    settings = editor.settings(**overrides)
    default_lambda = settings.region_hold_threshold
    common = dict(split=args.split, num_examples=args.num, batch_size=args.batch_size, show_progress=True)

    lambdas, filters, gammas = {}, {}, {}
    if "lambda" in sweeps:
        lambdas = inference.evaluate_split(
            editor, thresholds={f"{lam:g}": lam for lam in lambdas_to_run}, settings=settings, **common
        )["results"]
    for name in FILTERS if "filter" in sweeps else ():
        filtered = dataclasses.replace(settings, filter=name)
        filters[name] = inference.evaluate_split(
            editor, thresholds={"hold": default_lambda}, settings=filtered, **common
        )["results"]["hold"]
    for gamma in GAMMAS if "gamma" in sweeps else ():
        gammas[f"{gamma:g}"] = inference.evaluate_split(
            editor, thresholds={"plain": 0.0}, settings=settings, gamma=gamma, **common
        )["results"]["plain"]

    report = {
        "command": f"python benchmarks/editmgt_sweeps.py --checkpoint {args.checkpoint} --num {args.num}{flags}",
        "checkpoint_step": editor.step,
        "split": args.split,
        "settings": dataclasses.asdict(settings),
        "lambda_sweep": lambdas,
        "filters_at_default_lambda": filters,
        "gamma_sweep_at_lambda_0": gammas,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    for title, rows in (
        ("lambda", lambdas),
        (f"filter (lambda={default_lambda:g})", filters),
        ("gamma (lambda=0)", gammas),
    ):
        if rows:
            print(f"\n| {title} | success | L1 outside edit mask |\n|---|---|---|")
            print("\n".join(_row(name, result) for name, result in rows.items()))


if __name__ == "__main__":
    main()
