"""Rejection sampling of a flow editor on world training examples: its own accepted edits as SFT data.

  python benchmarks/rejection_samples.py --run workdir/fsft12k_base --num 4096 --seeds 4 \
      --out workdir/self_own.npz --out_ground_truth workdir/self_world.npz \
      --report benchmarks/results/rejection_samples_fsft12k_base.json

Every example of the first `--num` of the `--split` split (the run's world: size, seed, edit types) is edited from up to
`--seeds` initial noises with the run's ODE sampler; the first edit the synthetic-world verifier accepts is kept.
`--out` gets those examples with the kept edits as their targets, `--out_ground_truth` the same examples with the
world's targets (the control); both are `editing_jax.data.self_samples` files, which `editing-jax train` reads with
`--config.data.source=self_samples --config.data.data_dir=FILE`. The report holds the counts: accepted examples per
edit type and pass@k over the seeds. Noise seeds differ from `cogniedit_eval.py`'s (which edits the `test` split).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cogniedit_eval  # noqa: E402

_NOISE_SEED_OFFSET = 1_000_003  # keeps these noises apart from cogniedit_eval's (batch index + 10,000 x seed)


def collect(editor, batches: list[dict], seeds: int, progress: bool = True) -> dict:
    """Edits each batch from up to `seeds` noises (a batch stops once every example is accepted).

    Returns:
        {'accepted': `[N]` bool, 'images': `[N, S, S, 3]` uint8 (the first accepted edit, zeros where none),
        'success': `[K, N]` bool (False for noises not tried), 'edit_type': `[N]` str}.
    """
    from tqdm import tqdm

    from editing_jax.methods import editmgt, flow_edit

    settings = flow_edit.FlowSettings.from_config(editor.config.sampling)
    edit_fn = flow_edit.make_edit_fn(editor.model, settings)
    accepted, images, success, types = [], [], [], []
    for index, batch in enumerate(tqdm(batches, desc="rejection sampling", unit="batch", disable=not progress)):
        size = len(batch["source_image"])
        batch_accepted = np.zeros(size, bool)
        batch_images = np.zeros_like(np.asarray(batch["target_image"]))
        batch_success = np.zeros((seeds, size), bool)
        for seed in range(seeds):
            out = editmgt.run_edits(edit_fn, editor.params, editor.model_state, batch, settings,
                                    seed=_NOISE_SEED_OFFSET + index + 10_000 * seed)  # fmt: skip
            passed = editmgt.score_edits(out, batch)["success"] > 0  # [B]
            batch_success[seed] = passed
            new = passed & ~batch_accepted
            batch_images[new] = out["images"][new]
            batch_accepted |= passed
            if batch_accepted.all():
                break
        accepted.append(batch_accepted)
        images.append(batch_images)
        success.append(batch_success)
        types.extend(str(t) for t in batch["edit_type"])
    return {
        "accepted": np.concatenate(accepted),
        "images": np.concatenate(images),
        "success": np.concatenate(success, axis=1),
        "edit_type": np.asarray(types),
    }


def report(result: dict) -> dict:
    """Counts of `collect`'s result: accepted per edit type and pass@k (exact: a batch stops only once all its examples
    passed, and pass@k counts an example from its first success on)."""
    types = result["edit_type"]
    per_type = collections.Counter(types[result["accepted"]].tolist())
    totals = collections.Counter(types.tolist())
    return {
        "num_examples": len(types),
        "num_accepted": int(result["accepted"].sum()),
        "accepted_per_edit_type": {t: [per_type.get(t, 0), totals[t]] for t in sorted(totals)},
        "pass_at_k": cogniedit_eval.pass_at_k(result["success"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a flow_edit (or GRPO) run")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=4, help="initial noises tried per example")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", required=True, help="self-sample file with the accepted edits as targets")
    parser.add_argument("--out_ground_truth", default="", help="the same examples with the world's targets")
    parser.add_argument("--report", default="", help="JSON counts (accepted per edit type, pass@k)")
    args = parser.parse_args()
    if args.seeds < 1 or args.num < 1:
        parser.error("--seeds and --num must be >= 1")
    for path in (args.out, args.out_ground_truth, args.report):
        if path and pathlib.Path(path).is_dir():
            parser.error(f"{path} is a directory")

    from editing_jax.data import self_samples
    from editing_jax.train import data

    editor, batches = cogniedit_eval.load_run(args.run, args.split, args.num, args.batch_size)
    result = collect(editor, batches, args.seeds)
    counts = report(result)
    command = (f"python benchmarks/rejection_samples.py --run {args.run} --split {args.split} --num {args.num} "
               f"--seeds {args.seeds}")  # fmt: skip
    counts = {"command": command, "run": args.run, "step": editor.step, **counts}
    print(json.dumps(counts), flush=True)
    if not counts["num_accepted"]:
        sys.exit("no edit was accepted; nothing written")
    world = {
        "split": args.split,
        "world_seed": int(editor.config.data.seed),
        "size": int(editor.config.data.size),
        "edit_types": data.world_edit_types({"edit_types": ""}),
        "indices": np.flatnonzero(result["accepted"]),
        "info": counts,
    }
    self_samples.save_self_samples(args.out, target_images=result["images"][result["accepted"]], **world)
    if args.out_ground_truth:
        self_samples.save_self_samples(args.out_ground_truth, **world)
    if args.report:
        pathlib.Path(args.report).write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
