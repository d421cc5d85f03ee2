"""`editing-jax quickstart`: the 32 px world -> VQ tokenizer -> tiny EditMGT -> held-out evaluation and figures.

Stages (each resumable: a finished stage is skipped, an interrupted training resumes from its checkpoint):
  1. world: a preview grid of held-out edits and the prepared test split (tfds array_record) under `world/`;
  2. vq: `configs/tokenizer/vq.py:size=32,patch` (the local patch tokenizer), 100 k-means steps, in `vq/`;
  3. editmgt: `configs/editmgt/edit.py:size=32,quick` in `editmgt/`, tokenizer from stage 2 (with a time budget,
     `minutes`, its step count is sized to this machine first: see `budget_steps`);
  4. eval: held-out verifier success per edit type with and without region hold, a lambda sweep, figures.

Outputs in WORKDIR: quickstart.json (all metrics and stage timings), grid.png (source | output | attention map |
held region, instruction as row label), lambda_sweep.png (success and preservation L1 vs lambda, EditMGT Fig. 4).
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import sys
import time
from typing import Any

import numpy as np

from editing_jax import config_lib
from editing_jax.train import writers

logger = logging.getLogger(__name__)
REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
VQ_CONFIG = "tokenizer/vq.py:size=32,patch"
EDITMGT_CONFIG = "editmgt/edit.py:size=32,quick"
# The 15-minute budget: the patch VQ's k-means has converged by step 100 (docs/RESULTS.md), and training-time sample
# grids would compile and run the sampler for figures the evaluation stage draws anyway.
VQ_OVERRIDES = ("--config.train.num_steps=100",)
EDITMGT_OVERRIDES = ("--config.train.sample_every=0",)
SWEEP_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
GRID_ROWS = 10
# A time budget sizes EditMGT from the steps after CALIBRATION_WARMUP of CALIBRATION_STEPS timed steps of a throwaway
# run (the first steps are slower: the data pipeline fills). EVAL_RESERVE of the budget is left for the evaluation
# stage (38 s of 15 min on the slowest CPU measured), the rest of the rate kept as a margin.
CALIBRATION_STEPS = 60
CALIBRATION_WARMUP = 20
EVAL_RESERVE = 0.08
RATE_MARGIN = 0.95
MIN_BUDGET_STEPS = 100
MAX_BUDGET_STEPS = 40_000  # the `long` variant's schedule
BUDGET_FILE = "editmgt_budget.json"


class BudgetError(ValueError):
    """The time budget leaves too few EditMGT steps on this machine."""


def _log(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def _load(spec: str, overrides: list[str]):
    path = REPO_CONFIGS / spec.split(":")[0]
    if not path.exists():
        raise config_lib.ConfigError(f"quickstart needs the repository's configs/ ({path} is missing)")
    return config_lib.load_config(str(REPO_CONFIGS / spec), overrides)


def _finished(run_dir: pathlib.Path, num_steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    try:
        return int(json.loads(summary.read_text()).get("steps", -1)) >= num_steps
    except (ValueError, OSError):
        return False


def _train(spec: str, overrides: list[str], run_dir: pathlib.Path, show_progress: bool) -> dict:
    from editing_jax.train import trainer

    config = _load(spec, overrides)
    if _finished(run_dir, int(config.train.num_steps)):
        _log(f"{run_dir.name}: already trained, skipping")
        return json.loads((run_dir / "summary.json").read_text())
    run = trainer.build_trainer(config, run_dir, progress=show_progress)
    return run.run()


def budget_steps(minutes: float, elapsed_seconds: float, steps_per_second: float, compile_seconds: float) -> int:
    """EditMGT steps that fit what is left of a `minutes` budget after `elapsed_seconds`.

    The training gets the budget less the time spent, the evaluation's reserve (EVAL_RESERVE of the budget) and one
    compile, at RATE_MARGIN of the calibrated rate; capped at MAX_BUDGET_STEPS.

    Raises:
        BudgetError: fewer than MIN_BUDGET_STEPS steps fit.
    """
    budget = 60.0 * minutes
    seconds = budget - elapsed_seconds - EVAL_RESERVE * budget - compile_seconds
    steps = int(max(seconds, 0.0) * steps_per_second * RATE_MARGIN)
    if steps < MIN_BUDGET_STEPS:
        raise BudgetError(
            f"--minutes {minutes:g} leaves time for {steps} EditMGT steps on this machine (at {steps_per_second:.2f} "
            f"steps/s after {elapsed_seconds:.0f} s); give it more minutes or set --editmgt_steps"
        )
    return min(steps, MAX_BUDGET_STEPS)


def _steady_rate(run_dir: pathlib.Path, first: int, last: int) -> float:
    """Steps per second between steps `first` and `last` of the run in `run_dir`.

    Each logged `steps_per_second` is the mean since the loop started, so step s was reached s / rate seconds in.
    """
    rates = writers.read_scalar(run_dir, "steps_per_second")
    seconds = {step: step / rates[step] for step in (first, last)}
    return (last - first) / (seconds[last] - seconds[first])


def _sized_steps(workdir: pathlib.Path, overrides: list[str], minutes: float | None, start: float,
                 show_progress: bool) -> int:  # fmt: skip
    """The budget's EditMGT step count: the stored one when resuming, else calibrated now (and stored)."""
    stored = workdir / BUDGET_FILE
    if stored.exists():
        record = json.loads(stored.read_text())
        _log(f"editmgt: {record['num_steps']} steps, sized by an earlier run to {record['minutes']:g} minutes")
        return int(record["num_steps"])
    if (workdir / "editmgt" / "config.json").exists():
        raise BudgetError(f"{workdir / 'editmgt'} holds a run of a fixed step count; size a new one in a new --workdir")
    calibration_dir = workdir / "editmgt_calibration"
    shutil.rmtree(calibration_dir, ignore_errors=True)
    _log(f"editmgt: timing {CALIBRATION_STEPS} steps to size the run to {minutes:g} minutes")
    calibration = _train(EDITMGT_CONFIG, [*overrides, f"--config.train.num_steps={CALIBRATION_STEPS}",
                                          f"--config.train.checkpoint_every={CALIBRATION_STEPS}",
                                          f"--config.train.log_every={CALIBRATION_WARMUP}"],
                         calibration_dir, show_progress)  # fmt: skip
    rate = _steady_rate(calibration_dir, CALIBRATION_WARMUP, CALIBRATION_STEPS)
    shutil.rmtree(calibration_dir, ignore_errors=True)
    compile_seconds = calibration["compile"]["compile_seconds"]
    steps = budget_steps(minutes, time.perf_counter() - start, rate, compile_seconds)
    record = {"num_steps": steps, "minutes": minutes, "calibration_steps_per_second": round(rate, 3),
              "calibration_compile_seconds": compile_seconds}  # fmt: skip
    stored.write_text(json.dumps(record, indent=2) + "\n")
    _log(f"editmgt: {rate:.2f} steps/s here, {steps} steps fit the budget")
    return steps


def _world_stage(workdir: pathlib.Path, num_eval: int, show_progress: bool) -> None:
    from editing_jax import viz
    from editing_jax.data import image_io, tfds_world
    from editing_jax.data.world import edits

    world_dir = workdir / "world"
    preview = world_dir / "preview.png"
    if not preview.exists():
        tfds_world.prepare_world_dataset(world_dir / "tfds", split_sizes={"test": num_eval}, size=32, seed=0,
                                         show_progress=show_progress)  # fmt: skip
        samples = [edits.generate_sample("test", 0, i, edits.WorldConfig(size=32)) for i in range(8)]
        rows = [[s.source_image, s.target_image] for s in samples]
        grid = viz.image_grid(rows, row_labels=[s.instruction for s in samples], column_labels=["source", "target"])
        image_io.write_image_atomic(preview, grid)


def _figures(workdir: pathlib.Path, editor, settings, sweep: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from editing_jax import viz
    from editing_jax.data import image_io, pipeline
    from editing_jax.data.world import edits
    from editing_jax.methods import editmgt

    source = pipeline.WorldSource("test", GRID_ROWS, 0, edits.WorldConfig(size=editor.image_size))
    batch = pipeline.collate([source[i] for i in range(GRID_ROWS)])
    batch = editor.model.prepare_batch(batch)
    outputs = editor.run(batch, settings)
    rows = []
    for i in range(GRID_ROWS):
        rows.append([
            batch["source_image"][i],
            batch["target_image"][i],
            outputs["images"][i],
            editmgt.attention_to_rgb(outputs["attention"][i : i + 1])[0],
            editmgt.attention_to_rgb(outputs["held"][i : i + 1].astype(np.float32))[0],
        ])  # fmt: skip
    grid = viz.image_grid(
        rows,
        row_labels=[str(t) for t in batch["instruction"]],
        column_labels=["source", "target", "output", "attention", f"held (lambda={settings.region_hold_threshold})"],
        label_width=260,
    )
    image_io.write_image_atomic(workdir / "grid.png", grid)

    lambdas = [sweep[name]["region_hold_threshold"] for name in sweep]
    success = [100.0 * sweep[name]["verifier_success"] for name in sweep]
    l1 = [sweep[name]["preservation_l1"] for name in sweep]
    figure, left = plt.subplots(figsize=(5, 3.2), dpi=120)
    left.plot(lambdas, success, "o-", color="tab:blue", label="verifier success")
    left.set_xlabel("region-hold threshold lambda")
    left.set_ylabel("held-out verifier success (%)", color="tab:blue")
    right = left.twinx()
    right.plot(lambdas, l1, "s--", color="tab:red", label="L1 outside edit mask")
    right.set_ylabel("preservation L1", color="tab:red")
    left.set_title("Region hold: success vs preservation")
    figure.tight_layout()
    path = workdir / "lambda_sweep.png"
    figure.savefig(path.with_name(path.name + ".tmp.png"))
    plt.close(figure)
    path.with_name(path.name + ".tmp.png").replace(path)


def run(workdir: str | pathlib.Path, *, show_progress: bool = True, num_eval: int = 256,
        vq_overrides: list[str] | None = None, editmgt_overrides: list[str] | None = None,
        minutes: float | None = None) -> dict:  # fmt: skip
    """Runs all stages; returns (and writes to WORKDIR/quickstart.json) the report.

    `minutes`: a wall-time budget for the whole run; EditMGT's step count is then sized to this machine (timed on a
    throwaway run, stored in WORKDIR/editmgt_budget.json so a resumed run keeps it) and overrides the config's.
    """
    from editing_jax import inference

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str, index: int, fn):
        _log(f"stage {index}/4: {name} (elapsed {time.perf_counter() - start:.0f} s)")
        begin = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - begin, 1)
        return result

    stage("world", 1, lambda: _world_stage(workdir, num_eval, show_progress))
    vq_all = [*VQ_OVERRIDES, *(vq_overrides or [])]
    vq_summary = stage("vq", 2, lambda: _train(VQ_CONFIG, vq_all, workdir / "vq", show_progress))
    mgt_overrides = [f"--config.tokenizer.checkpoint={workdir / 'vq'}", "--config.data.num_eval_examples=0"]
    mgt_overrides += [*EDITMGT_OVERRIDES, *(editmgt_overrides or [])]
    if minutes is not None or (workdir / BUDGET_FILE).exists():  # a resumed budget run keeps its step count
        begin = time.perf_counter()
        steps = _sized_steps(workdir, mgt_overrides, minutes, start, show_progress)
        timings["editmgt_sizing"] = round(time.perf_counter() - begin, 1)
        mgt_overrides.append(f"--config.train.num_steps={steps}")
    mgt_summary = stage("editmgt", 3, lambda: _train(EDITMGT_CONFIG, mgt_overrides, workdir / "editmgt", show_progress))

    def evaluate():
        editor = inference.load_editor(workdir / "editmgt")
        settings = editor.settings()
        thresholds = {f"lambda={lam:g}": lam for lam in SWEEP_THRESHOLDS}
        default_name = f"lambda={settings.region_hold_threshold:g}"
        if default_name not in thresholds:
            thresholds[default_name] = settings.region_hold_threshold
        report = inference.evaluate_split(
            editor, split="test", num_examples=num_eval, thresholds=thresholds, show_progress=show_progress
        )
        _figures(workdir, editor, settings, report["results"])
        return report, default_name

    report, default_name = stage("eval", 4, evaluate)
    results = report["results"]
    plain, hold = results["lambda=0"], results[default_name]
    summary = {
        "held_out_verifier_success": plain["verifier_success"],
        "held_out_verifier_success_region_hold": hold["verifier_success"],
        "preservation_l1": plain["preservation_l1"],
        "preservation_l1_region_hold": hold["preservation_l1"],
        "region_hold_threshold": hold["region_hold_threshold"],
        "per_edit_type": {t: v["verifier_success"] for t, v in plain["per_edit_type"].items()},
        "vq_verifier_success": vq_summary.get("eval", {}).get("eval/verifier_success"),
        "editmgt_steps": mgt_summary.get("steps"),
        "minutes_budget": minutes,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": timings,
    }
    full = {"summary": summary, "eval": report, "vq_summary": vq_summary, "editmgt_summary": mgt_summary}
    tmp = workdir / "quickstart.json.tmp"
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    tmp.replace(workdir / "quickstart.json")
    _log(f"done in {summary['wall_seconds']:.0f} s: held-out success {100 * summary['held_out_verifier_success']:.1f} %"
         f" (region hold {100 * summary['held_out_verifier_success_region_hold']:.1f} %); see {workdir}")  # fmt: skip
    return full
