"""Training reward vs training FLOPs of GRPO runs (CogniEdit Fig. 6 analogue), grouped by label over seeds.

  python benchmarks/grpo_reward_curves.py --group "Flow-GRPO" workdir/grpo_s0 workdir/grpo_s1 \
      --group "Dense GRPO" workdir/dense_s0 workdir/dense_s1 --smooth 5 \
      --out benchmarks/results/grpo_reward_curves.json --png docs/images/grpo_reward_curves.png

Each run's `metrics.jsonl` gives the mean rollout reward of the logged steps and `summary.json` the compiled step's
FLOPs (XLA's cost analysis, per device, times the device count), so the x axis is cumulative training FLOPs. Curves
are smoothed with a trailing moving average over `--smooth` logged points; the plot shows each group's mean over
seeds and its min-max band. The JSON also holds, per group, the mean reward over the last quarter of training.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from editing_jax.train import writers


def load_run(path: str) -> dict:
    run = pathlib.Path(path)
    summary = json.loads((run / "summary.json").read_text())
    compile_info = summary["compile"]
    flops = float(compile_info["per_device_flops_per_step"]) * int(compile_info.get("num_devices", 1))
    by_step = writers.read_scalar(run, "reward")
    steps, rewards = list(by_step), list(by_step.values())
    if not steps:
        raise SystemExit(f"{run}/metrics.jsonl has no reward records (is it a GRPO run?)")
    return {"run": str(run), "flops_per_step": flops, "steps": steps, "rewards": rewards}


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average over up to `window` points."""
    values = np.asarray(values, np.float64)
    return np.array([values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"))
    parser.add_argument("--smooth", type=int, default=5)
    parser.add_argument("--out", default="")
    parser.add_argument("--png", default="")
    args = parser.parse_args()
    groups = []
    for label, *runs in args.group:
        if not runs:
            raise SystemExit(f"group {label!r} has no runs")
        loaded = [load_run(run) for run in runs]
        length = min(len(run["steps"]) for run in loaded)
        curves = np.stack([smooth(run["rewards"][:length], args.smooth) for run in loaded])  # [seeds, T]
        raw = np.stack([run["rewards"][:length] for run in loaded])
        tflops = np.asarray(loaded[0]["steps"][:length]) * loaded[0]["flops_per_step"] / 1e12
        last_quarter = raw[:, -max(1, length // 4) :].mean(axis=1)  # [seeds]
        groups.append({"label": label, "runs": runs, "tflops": tflops.tolist(), "mean": curves.mean(0).tolist(),
                       "min": curves.min(0).tolist(), "max": curves.max(0).tolist(),
                       "flops_per_step": loaded[0]["flops_per_step"],
                       "last_quarter_reward_per_seed": last_quarter.tolist(),
                       "last_quarter_reward": float(last_quarter.mean())})  # fmt: skip
        print(json.dumps({"label": label, "seeds": len(runs), "last_quarter_reward": float(last_quarter.mean()),
                          "per_seed": [round(x, 3) for x in last_quarter.tolist()]}), flush=True)  # fmt: skip
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"groups": groups}, indent=2) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for group in groups:
            line = axis.plot(group["tflops"], group["mean"], label=f"{group['label']} ({len(group['runs'])} seeds)")
            axis.fill_between(group["tflops"], group["min"], group["max"], alpha=0.2, color=line[0].get_color())
        axis.set_xlabel("training TFLOPs (XLA cost analysis of the compiled step)")
        axis.set_ylabel(f"rollout reward (0-15), moving average of {args.smooth} logs")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
