"""`editing-jax quickstart` end to end with every stage shortened to a few steps (the real run is in RESULTS.md)."""

import json

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
