"""How much of an EditMGT editor's preservation error is small quantization noise: snap near-source pixels back.

  python benchmarks/pixel_snap_probe.py --checkpoint workdir/RUN --num 1024 [--split test]
      [--tolerances 0,8,16,32,48] [--out benchmarks/results/pixel_snap_probe_RUN.json]

For plain decoding (lambda 0) and region hold (the checkpoint's lambda), every output pixel whose largest channel
difference from the source is at most `tolerance` (0-255) is replaced by the source pixel, then scored by the
verifier: success and L1 outside the edit mask per tolerance. Pixels within a small tolerance of the source are where
the output only re-renders the source through the tokenizer (a changed 2x2 token cell whose other pixels keep their
color); what a tolerance leaves is error larger than it. A diagnostic of the tokenizer's floor, not an editing option.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from editing_jax.data.world.edits import SPLITS

SETTINGS = ("plain", "hold")


def snap_to_source(images: np.ndarray, source: np.ndarray, tolerance: int) -> np.ndarray:
    """`[B, H, W, 3]` uint8 `images` with the `source` pixel wherever no channel differs from it by more than
    `tolerance` (0 leaves only exact matches, which are equal anyway)."""
    difference = np.abs(images.astype(np.int16) - source.astype(np.int16)).max(axis=-1, keepdims=True)  # [B, H, W, 1]
    return np.where(difference <= tolerance, source, images).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num", type=int, default=1024)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--tolerances", default="0,8,16,32,48", help="comma-separated, 0-255")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tolerances = [int(t) for t in args.tolerances.split(",")]

    from hold_map_probe import OUTCOME_SUMS, add_outcome, outcome_mean

    from editing_jax import inference
    from editing_jax.methods import editmgt

    editor = inference.load_editor(args.checkpoint)
    settings = editor.settings()
    edit_fn = editor.edit_fn(settings)
    sums = {(name, t): dict.fromkeys(OUTCOME_SUMS, 0.0) for name in SETTINGS for t in tolerances}
    for index, raw in enumerate(inference.world_split_batches(editor, args.split, args.num)):
        batch = editor.model.prepare_batch(raw)
        # Region hold at the checkpoint's lambda (None) and plain decoding (lambda 0), with the same seed.
        lambdas = {"plain": 0.0, "hold": None}
        outputs = {
            name: editmgt.run_edits(
                edit_fn,
                editor.params,
                editor.model_state,
                batch,
                settings,
                seed=index,
                region_hold_threshold=lambdas[name],
            )
            for name in SETTINGS
        }
        source = np.asarray(batch["source_image"])  # [B, H, W, 3] uint8
        for name, out in outputs.items():
            for tolerance in tolerances:
                snapped = {**out, "images": snap_to_source(np.asarray(out["images"]), source, tolerance)}
                scores = editmgt.score_edits(snapped, batch)
                add_outcome(sums[name, tolerance], scores["success"], scores["preservation_l1"])
    report = {
        "command": f"python benchmarks/pixel_snap_probe.py --checkpoint {args.checkpoint} --num {args.num} "
        f"--split {args.split} --tolerances {args.tolerances}",
        "region_hold_threshold": settings.region_hold_threshold,
        "outcomes": {name: {str(t): outcome_mean(sums[name, t]) for t in tolerances} for name in SETTINGS},
    }
    out_path = pathlib.Path(
        args.out or f"benchmarks/results/pixel_snap_probe_{pathlib.Path(args.checkpoint).name}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print("| tolerance | success plain / hold | L1 plain / hold | hold vs plain L1 |")
    print("|---|---|---|---|")
    for t in tolerances:
        plain, hold = (report["outcomes"][name][str(t)] for name in SETTINGS)
        print(f"| {t} | {plain['verifier_success']:.1%} / {hold['verifier_success']:.1%} | "
              f"{plain['preservation_l1']:.5f} / {hold['preservation_l1']:.5f} | "
              f"{hold['preservation_l1'] / plain['preservation_l1'] - 1:+.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
