"""Held-out verifier success and world reward of CogniEdit runs (SFT, GRPO, Dense GRPO) on the same examples.

  python benchmarks/cogniedit_eval.py --runs workdir/cogniedit_sft32 workdir/cogniedit_grpo --num 256 \
      --out benchmarks/results/cogniedit_eval.json

Each run's editor is rebuilt from its saved config and evaluated with ODE edits (its sampling settings, the same
seeds for every run): verifier success overall and per edit type, preservation L1, the mean world reward and the
edits' mean brightness in [0, 1] (what `grpo.reward=brightness` sanity-check runs optimize) and their mean target
fidelity in [0, 5] (closeness to the world's target inside the edit mask, what `grpo.reward=world_fidelity` adds).
`--guidance 0 2 4` evaluates each run at several classifier-free guidance scales; `--edit_types remove,style` draws
only those edit types (a larger sample of the types an RL curriculum trains on). `--start_time 1 0.9 0.8` starts the
ODE from the noised source at those times (img2img, `FlowSettings.start_time`; 1 = pure noise). `--seeds K` edits every example from
K initial noises and adds pass@k for k = 1..K (an example passes if any of its first k edits succeeds): how many
examples the editor can already solve, the room a policy that sharpens its own samples (GRPO) has to gain.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def load_run(path: str, split: str, num: int, batch_size: int, edit_types: str = ""):
    """The run's editor and the prepared held-out batches (`edit_types`: `data.edit_types` syntax, "" = all)."""
    from editing_jax import inference
    from editing_jax.data import pipeline
    from editing_jax.data.world import edits
    from editing_jax.methods import grpo
    from editing_jax.train import data

    editor = inference.load_editor(path)  # a GRPO run: its SFT base joined with the adapters and token focus
    world = edits.WorldConfig(size=int(editor.config.data.size),
                              edit_types=data.world_edit_types({"edit_types": edit_types}))  # fmt: skip
    source = pipeline.WorldSource(split, num, int(editor.config.data.seed), world)
    dataset = pipeline.make_dataset(source, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                                    drop_remainder=False)  # fmt: skip
    return editor, [grpo.prepare_batch(editor.model, batch) for batch in dataset]


def pass_at_k(success: np.ndarray) -> list[float]:
    """`success [K, N]` (noise seed, example) -> the fraction of examples one of their first k seeds solves, k = 1..K."""
    solved = np.logical_or.accumulate(np.asarray(success, bool), axis=0)  # [K, N]
    return [float(row.mean()) for row in solved]


def score_run(path: str, editor, batches: list[dict], guidance_scale: float | None = None,
              steps: int | None = None, noise_seed: int = 0, start_time: float | None = None) -> dict:  # fmt: skip
    """ODE edits of `batches` at the run's sampling settings (or the given guidance / steps / start time), scored.

    `noise_seed` picks the initial noises (seed 0 is what every earlier result used).
    """
    from editing_jax.methods import editmgt, flow_edit, grpo

    settings = flow_edit.FlowSettings.from_config(editor.config.sampling, guidance_scale=guidance_scale,
                                                  num_steps=steps, start_time=start_time)  # fmt: skip
    edit_fn = flow_edit.make_edit_fn(editor.model, settings)
    rewards, successes, l1s, types, brightness, fidelity = [], [], [], [], [], []
    for index, batch in enumerate(batches):  # one edit pass per batch, scored on the host
        out = editmgt.run_edits(
            edit_fn, editor.params, editor.model_state, batch, settings, seed=index + 10_000 * noise_seed
        )
        scores = grpo.host_world_reward(batch["source_image"], out["images"], batch["target_image"],
                                        batch["source_scene_bytes"], batch["target_scene_bytes"],
                                        batch["edit_mask"])  # fmt: skip
        verified = editmgt.score_edits(out, batch)
        rewards.append(scores[:, 0])
        brightness.append(grpo.mean_brightness(out["images"]))
        fidelity.append(grpo.target_fidelity(out["images"], batch["target_image"], batch["edit_mask"]))
        successes.append(verified["success"])
        l1s.append(verified["preservation_l1"])
        types.extend(str(t) for t in batch["edit_type"])
    success, types = np.concatenate(successes), np.asarray(types)
    return {
        "run": path,
        "step": editor.step,
        "guidance_scale": settings.guidance_scale,
        "num_steps": settings.num_steps,
        "start_time": settings.start_time,
        "verifier_success": float(success.mean()),
        "preservation_l1": float(np.nanmean(np.concatenate(l1s))),
        "mean_reward": float(np.concatenate(rewards).mean()),
        "mean_brightness": float(np.concatenate(brightness).mean()),
        "mean_target_fidelity": float(np.concatenate(fidelity).mean()),  # 0-5: closeness to the target in the mask
        "per_edit_type": {t: float(success[types == t].mean()) for t in sorted(set(types.tolist()))},
        "per_example_success": success.astype(int).tolist(),  # for `editing-jax compare FILE#ROW`
        "per_example_edit_type": types.tolist(),
    }


def score_run_seeds(path: str, editor, batches: list[dict], guidance_scale: float | None = None,
                    steps: int | None = None, seeds: int = 1, start_time: float | None = None) -> dict:  # fmt: skip
    """`score_run` at noise seed 0; with `seeds` > 1 also each seed's success and pass@k over the seeds."""
    row = score_run(path, editor, batches, guidance_scale, steps, start_time=start_time)
    if seeds > 1:
        success = [row["per_example_success"]]
        success += [score_run(path, editor, batches, guidance_scale, steps, seed, start_time)["per_example_success"]
                    for seed in range(1, seeds)]  # fmt: skip
        row["success_per_seed"] = [float(np.mean(s)) for s in success]
        row["pass_at_k"] = pass_at_k(np.asarray(success))
    return row


def evaluate_run(path: str, split: str, num: int, batch_size: int, edit_types: str = "",
                 guidance_scale: float | None = None, steps: int | None = None, seeds: int = 1,
                 start_time: float | None = None) -> dict:  # fmt: skip
    """`score_run_seeds` of `load_run`."""
    editor, batches = load_run(path, split, num, batch_size, edit_types)
    return score_run_seeds(path, editor, batches, guidance_scale, steps, seeds, start_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--edit_types", default="", help="edit types to draw, data.edit_types syntax (default: all)")
    parser.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[None],
        help="classifier-free guidance scales to evaluate (default: each run's config)",
    )
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: each run's config)")
    parser.add_argument(
        "--start_time",
        type=float,
        nargs="+",
        default=[None],
        help="ODE start times in (0, 1] to evaluate, from the noised source (default: 1, pure noise)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="initial noises per example; > 1 adds pass@k")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    rows = []
    for run in args.runs:
        editor, batches = load_run(run, args.split, args.num, args.batch_size, args.edit_types)
        for guidance in args.guidance:
            for start_time in args.start_time:
                row = score_run_seeds(run, editor, batches, guidance, args.steps, args.seeds, start_time)
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("per_example")}), flush=True)
                rows.append(row)
    if args.out:
        command = f"python benchmarks/cogniedit_eval.py --runs {' '.join(args.runs)} --num {args.num}"
        if args.edit_types:
            command += f" --edit_types {args.edit_types}"
        if args.guidance != [None]:
            command += " --guidance " + " ".join(str(g) for g in args.guidance)
        if args.steps is not None:
            command += f" --steps {args.steps}"
        if args.start_time != [None]:
            command += " --start_time " + " ".join(str(t) for t in args.start_time)
        if args.seeds > 1:
            command += f" --seeds {args.seeds}"
        pathlib.Path(args.out).write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
