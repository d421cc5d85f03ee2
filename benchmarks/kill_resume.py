"""python benchmarks/kill_resume.py --trials 10

Randomized kill -9 / resume check of the generic trainer (the slow version of
tests/test_trainer.py::test_kill_9_at_random_moments_then_resume_is_bit_identical): each trial starts the toy
training script (60 steps, an async checkpoint every 3 steps, 8 fake CPU devices), SIGKILLs it 1-3 times at random
moments (often during an async save), restarts it until it finishes, and compares params, optimizer state and model
state with an uninterrupted run bit for bit. Writes JSON (default benchmarks/results/kill_resume.json).
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ("--num_steps", "60", "--checkpoint_every", "3")


def _command(workdir, out):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    return [sys.executable, "-m", "tests.helpers.toy", "--workdir", str(workdir), "--out", str(out), *ARGS], env


def _checkpoint_dirs(workdir: pathlib.Path) -> list[str]:
    """Names in the checkpoint directory right after a kill (committed steps and any half-written temp dirs)."""
    directory = workdir / "checkpoints"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _identical(a_path, b_path) -> bool:
    a, b = np.load(a_path), np.load(b_path)
    return sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/kill_resume.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        command, env = _command(tmp / "reference", tmp / "reference.npz")
        subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
        trials = []
        for trial in range(args.trials):
            command, env = _command(tmp / f"trial{trial}", tmp / f"trial{trial}.npz")
            kill_times, steps_at_kill = [], []
            for _ in range(int(rng.integers(1, 4))):
                process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)  # fmt: skip
                delay = float(rng.uniform(2.0, 8.0))
                time.sleep(delay)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    kill_times.append(round(delay, 2))
                    process.wait()
                    steps_at_kill.append(_checkpoint_dirs(tmp / f"trial{trial}"))
                process.wait()
            subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
            ok = _identical(tmp / "reference.npz", tmp / f"trial{trial}.npz")
            trials.append({"kills_at_seconds": kill_times, "checkpoint_dirs_after_kill": steps_at_kill,
                           "bit_identical": ok})  # fmt: skip
            print(json.dumps(trials[-1]), flush=True)
    killed = [t for t in trials if t["kills_at_seconds"]]
    result = {
        "trials": len(trials),
        "trials_with_a_kill": len(killed),
        "kills": sum(len(t["kills_at_seconds"]) for t in trials),
        "bit_identical": sum(t["bit_identical"] for t in trials),
        "details": trials,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "details"}))
    path = REPO / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
