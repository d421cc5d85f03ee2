"""End to end on tiny configs: train a VQ and an EditMGT, then `editing-jax edit` and `eval` on the checkpoint."""

import json

import numpy as np
import pytest

from editing_jax import cli
from editing_jax.data import image_io
from editing_jax.data.world import edits
from tests.helpers import load_benchmark


def _run(capsys, *argv):
    code = cli.main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def editor_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("editmgt")
    common = ("--config.mesh.data=1", "--config.data.num_eval_examples=4", "--config.data.eval_batch_size=4")
    assert cli.main(["--quiet", "train", "--config", "configs/tokenizer/vq.py:size=32,tiny", "--workdir",
                     str(root / "vq"), "--config.train.num_steps=2", *common]) == 0  # fmt: skip
    assert cli.main(["--quiet", "train", "--config", "configs/editmgt/edit.py:size=32,tiny", "--workdir",
                     str(root / "mgt"), f"--config.tokenizer.checkpoint={root / 'vq'}", "--config.train.num_steps=3",
                     "--config.train.checkpoint_every=3", *common]) == 0  # fmt: skip
    return root


def test_training_writes_a_self_contained_checkpoint(editor_run):
    summary = json.loads((editor_run / "mgt" / "summary.json").read_text())
    assert summary["steps"] == 3
    for key in ("eval/plain/verifier_success", "eval/hold/verifier_success", "eval/hold/preservation_l1"):
        assert 0.0 <= summary["eval"][key] <= 1.0
    config = json.loads((editor_run / "mgt" / "config.json").read_text())
    assert config["tokenizer"]["model_json"] and "circle" in config["text"]["vocab"].split()
    assert list((editor_run / "mgt" / "samples").glob("*.png"))


def test_edit_writes_image_and_attention(editor_run, tmp_path, capsys):
    sample = edits.generate_sample("test", 0, 0, edits.WorldConfig(size=48))  # resized to the model's 32 px
    image_io.write_image_atomic(tmp_path / "in.png", sample.source_image)
    out, attention = tmp_path / "out.png", tmp_path / "attn.png"
    code, stdout, err = _run(capsys, "edit", "--checkpoint", str(editor_run / "mgt"), "--image",
                             str(tmp_path / "in.png"), "--instruction", sample.instruction, "--out", str(out),
                             "--save_attention", str(attention), "--steps", "3", "--region_hold_threshold", "0.5",
                             "--query", sample.edit.keyword or "the")  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["size"] == 32 and 0.0 <= report["held_fraction"] <= 1.0
    assert image_io.read_image(out).shape == (32, 32, 3)
    assert image_io.read_image(attention).shape == (32, 32, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--image", "/nonexistent.png"), "nonexistent.png"),
        (("--filter", "median"), "filter must be one of"),
        (("--map_scaling", "sum"), "map_scaling must be one of"),
        (("--attention_source", "cross"), "attention_source must be one of"),
        (("--query", "zebra"), "does not occur"),
    ],
)
def test_edit_errors_are_one_line(editor_run, tmp_path, capsys, extra, message):
    image_io.write_image_atomic(tmp_path / "in.png", np.zeros((32, 32, 3), np.uint8))
    args = {"--image": str(tmp_path / "in.png"), "--instruction": "make the red circle blue",
            "--out": str(tmp_path / "o.png")}  # fmt: skip
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    code, _, err = _run(capsys, "edit", "--checkpoint", str(editor_run / "mgt"),
                        *[item for pair in args.items() for item in pair])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_edit_rejects_a_tokenizer_checkpoint(editor_run, tmp_path, capsys):
    image_io.write_image_atomic(tmp_path / "in.png", np.zeros((32, 32, 3), np.uint8))
    code, _, err = _run(capsys, "edit", "--checkpoint", str(editor_run / "vq"), "--image", str(tmp_path / "in.png"),
                        "--instruction", "x", "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert code == 2 and "not an editor" in err


def test_eval_reports_per_edit_type(editor_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, stdout, err = _run(capsys, "eval", "--checkpoint", str(editor_run / "mgt"), "--split", "test", "--num",
                             "6", "--batch_size", "3", "--out", str(out), "--steps", "2")  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"plain", "hold"}
    assert report["settings"]["paste_source"] is True  # the edit config's default
    plain = report["results"]["plain"]
    assert plain["num_examples"] == 6 and plain["region_hold_threshold"] == 0.0
    assert sum(v["num_examples"] for v in plain["per_edit_type"].values()) == 6
    assert json.loads(stdout)["results"]["hold"]["verifier_success"] == report["results"]["hold"]["verifier_success"]
    assert len(plain["per_example_success"]) == 6 and np.mean(plain["per_example_success"]) == plain["verifier_success"]
    per_type = {t: plain["per_example_edit_type"].count(t) for t in plain["per_edit_type"]}
    assert per_type == {t: v["num_examples"] for t, v in plain["per_edit_type"].items()}

    code, stdout, err = _run(capsys, "compare", str(out), str(out), "--setting", "plain", "--setting_b", "hold")
    assert code == 0, err
    assert "| **all** | 6 |" in stdout
    first_type = sorted(per_type)[0]
    code, stdout, err = _run(capsys, "compare", str(out), str(out), "--types", first_type)
    assert code == 0, err
    assert f"| **{first_type}** | {per_type[first_type]} |" in stdout
    code, _, err = _run(capsys, "compare", str(out), str(out), "--types", "no_such_type")
    assert code == 2 and "not in the evaluations" in err
    other = tmp_path / "other.json"
    code, _, err = _run(capsys, "eval", "--checkpoint", str(editor_run / "mgt"), "--split", "test", "--num", "4",
                        "--out", str(other), "--steps", "2")  # fmt: skip
    assert code == 0, err
    code, _, err = _run(capsys, "compare", str(out), str(other))
    assert code == 2 and "not on the same examples" in err


def test_eval_decoding_flags_reach_the_sampler_and_lambda_zero_runs_no_hold_pass(editor_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, _, err = _run(capsys, "eval", "--checkpoint", str(editor_run / "mgt"), "--split", "val", "--num", "3",
                        "--out", str(out), "--steps", "1", "--token_temperature", "0", "--remask_noise", "0.5",
                        "--map_scaling", "max", "--region_hold_threshold", "0", "--no-paste_source")  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"plain"}
    settings = report["settings"]
    assert settings["paste_source"] is False
    assert settings["num_steps"] == 1 and settings["token_temperature"] == 0.0
    assert settings["temperature"] == 0.5 and settings["map_scaling"] == "max"


def test_sweeps_script_runs_only_the_chosen_lambdas_on_the_chosen_split(editor_run, tmp_path, monkeypatch, capsys):
    sweeps = load_benchmark("editmgt_sweeps")
    out = tmp_path / "sweeps.json"
    argv = ["editmgt_sweeps.py", "--checkpoint", str(editor_run / "mgt"), "--split", "val", "--num", "2", "--steps",
            "1", "--sweeps", "lambda", "--lambdas", "0,0.5", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    sweeps.main()
    report = json.loads(out.read_text())
    assert report["split"] == "val"
    assert set(report["lambda_sweep"]) == {"0", "0.5"}
    assert report["filters_at_default_lambda"] == {} and report["gamma_sweep_at_lambda_0"] == {}
    assert "--split val --sweeps lambda --lambdas 0,0.5" in report["command"]
    assert "| 0.5 |" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", [*argv[:-2], "--sweeps", "lambda,beta"])
    with pytest.raises(SystemExit) as error:
        sweeps.main()
    assert error.value.code == 2 and "unknown --sweeps ['beta']" in capsys.readouterr().err
