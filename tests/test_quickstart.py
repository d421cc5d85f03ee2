"""`editing-jax quickstart` end to end with every stage shortened to a few steps (the real run is in RESULTS.md)."""

import json
import time

import pytest

from editing_jax import cli, quickstart

SHORT = ["--config.train.num_steps=2", "--config.mesh.data=1"]


def test_quickstart_runs_all_stages_and_resumes(tmp_path):
    vq = SHORT + ["--config.data.num_eval_examples=4", "--config.data.eval_batch_size=4"]
    mgt = SHORT + ["--config.sampling.num_steps=2", "--config.data.batch_size=4"]
    report = quickstart.run(tmp_path, show_progress=False, num_eval=4, vq_overrides=vq, editmgt_overrides=mgt)
    summary = report["summary"]
    assert 0.0 <= summary["held_out_verifier_success"] <= 1.0
    assert set(summary["stage_seconds"]) == {"world", "vq", "editmgt", "eval"}
    sweep = report["eval"]["results"]
    assert [v["region_hold_threshold"] for v in sweep.values()][:3] == [0.0, 0.1, 0.2]
    assert all(v["num_examples"] == 4 for v in sweep.values())
    for name in ("grid.png", "lambda_sweep.png", "quickstart.json", "world/preview.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "quickstart.json").read_text())["summary"] == summary
    # A second run skips the finished training stages.
    again = quickstart.run(tmp_path, show_progress=False, num_eval=4, vq_overrides=vq, editmgt_overrides=mgt)
    assert again["summary"]["stage_seconds"]["vq"] < summary["stage_seconds"]["vq"]


def test_quickstart_cli_passes_editmgt_steps_and_rejects_nonpositive(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(workdir, **kwargs):
        calls.append(kwargs["editmgt_overrides"])
        return {"summary": {"held_out_verifier_success": 0.0}}

    monkeypatch.setattr(quickstart, "run", fake_run)
    assert cli.main(["quickstart", "--workdir", str(tmp_path), "--editmgt_steps", "1800"]) in (0, None)
    assert cli.main(["quickstart", "--workdir", str(tmp_path)]) in (0, None)
    assert calls == [["--config.train.num_steps=1800"], []]
    assert cli.main(["quickstart", "--workdir", str(tmp_path), "--editmgt_steps", "0"]) == 2
    assert "--editmgt_steps must be positive" in capsys.readouterr().err
    assert len(calls) == 2


def test_budget_steps_fit_what_is_left_of_the_budget():
    # 15 min = 900 s: 100 s spent, 72 s (8 %) kept for the evaluation, 50 s for one compile -> 678 s at 3 x 0.95 steps/s.
    assert quickstart.budget_steps(15, 100.0, 3.0, 50.0) == int(678 * 3.0 * 0.95)
    assert quickstart.budget_steps(15, 100.0, 1000.0, 50.0) == quickstart.MAX_BUDGET_STEPS
    with pytest.raises(quickstart.BudgetError, match="leaves time for 0 EditMGT steps"):
        quickstart.budget_steps(1, 100.0, 3.0, 50.0)
    with pytest.raises(quickstart.BudgetError, match="--minutes 2 leaves time for 90 EditMGT steps"):
        quickstart.budget_steps(2, 10.0, 1.0, 5.5)  # 120 - 10 - 9.6 - 5.5 = 94.9 s at 0.95 steps/s


def test_budget_calibrates_once_stores_the_step_count_and_reuses_it(tmp_path, monkeypatch):
    calls = []

    def fake_train(spec, overrides, run_dir, show_progress):
        calls.append((run_dir.name, overrides))
        run_dir.mkdir(parents=True)
        # Steps 20, 40, 60 reached at 10, 15, 20 s: 4 steps/s once the first (slow) 20 steps are done.
        lines = [{"step": step, "loss": 1.0, "steps_per_second": step / seconds}
                 for step, seconds in ((20, 10.0), (40, 15.0), (60, 20.0))]  # fmt: skip
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return {"steps": 60, "steps_per_second": 3.0, "compile": {"compile_seconds": 30.0}}

    monkeypatch.setattr(quickstart, "_train", fake_train)
    start = time.perf_counter()
    steps = quickstart._sized_steps(tmp_path, ["--a=1"], 10.0, start, show_progress=False)
    elapsed = time.perf_counter() - start
    assert quickstart.budget_steps(10.0, elapsed, 4.0, 30.0) <= steps <= quickstart.budget_steps(10.0, 0.0, 4.0, 30.0)
    assert calls == [("editmgt_calibration", ["--a=1", "--config.train.num_steps=60",
                                              "--config.train.checkpoint_every=60",
                                              "--config.train.log_every=20"])]  # fmt: skip
    assert not (tmp_path / "editmgt_calibration").exists()  # the throwaway run is removed
    record = json.loads((tmp_path / quickstart.BUDGET_FILE).read_text())
    assert record["num_steps"] == steps and record["minutes"] == 10.0
    assert record["calibration_steps_per_second"] == 4.0  # steps 20-60, not the run's mean of 3.0 with its slow start
    # A resumed run keeps the stored count, whatever its own budget, and times nothing.
    assert quickstart._sized_steps(tmp_path, ["--a=1"], 3.0, time.perf_counter(), show_progress=False) == steps
    assert len(calls) == 1
    # A workdir that already holds a fixed-step EditMGT run is not resized.
    other = tmp_path / "other"
    (other / "editmgt").mkdir(parents=True)
    (other / "editmgt" / "config.json").write_text("{}")
    with pytest.raises(quickstart.BudgetError, match="fixed step count"):
        quickstart._sized_steps(other, [], 10.0, time.perf_counter(), show_progress=False)


def test_quickstart_cli_minutes(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(workdir, **kwargs):
        calls.append(kwargs["minutes"])
        if kwargs["minutes"] == 1:
            raise quickstart.BudgetError("--minutes 1 leaves time for 3 EditMGT steps on this machine")
        return {"summary": {"held_out_verifier_success": 0.0}}

    monkeypatch.setattr(quickstart, "run", fake_run)
    assert cli.main(["quickstart", "--workdir", str(tmp_path), "--minutes", "15"]) in (0, None)
    assert calls == [15.0]
    capsys.readouterr()
    assert cli.main(["quickstart", "--workdir", str(tmp_path), "--minutes", "1"]) == 2
    err = capsys.readouterr().err
    assert "leaves time for 3 EditMGT steps" in err and len(err.strip().splitlines()) == 1
    for bad, message in ((["--minutes", "0"], "--minutes must be positive"),
                         (["--minutes", "5", "--editmgt_steps", "10"], "not both")):  # fmt: skip
        assert cli.main(["quickstart", "--workdir", str(tmp_path), *bad]) == 2
        assert message in capsys.readouterr().err
    assert calls == [15.0, 1.0]
