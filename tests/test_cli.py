"""End-to-end runs of the `editing-jax` CLI (in-process via cli.main, and one real subprocess)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from editing_jax import cli
from editing_jax.data import image_io, tfds_world
from editing_jax.data.world import edits


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_generate_writes_dataset_and_preview(tmp_path, capsys):
    out_dir = tmp_path / "world"
    code, out, err = _run(
        capsys, "data", "generate", "--out", str(out_dir), "--split", "val", "--num", "6", "--size", "32",
        "--seed", "3", "--preview", "3",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)  # stdout holds exactly the JSON result, even with tfds' progress output on.
    preview = image_io.read_image(report["preview"])
    assert preview.shape[0] > 3 * 32 and preview.dtype == np.uint8
    source = tfds_world.load_world_source(report["dataset_dir"], "val")
    assert len(source) == 6
    expected = edits.generate_sample("val", 3, 5, edits.WorldConfig(size=32)).to_example()
    np.testing.assert_array_equal(source[5]["target_image"], expected["target_image"])
    assert source[5]["instruction"] == expected["instruction"]


def test_config_override_and_unknown_key(tmp_path, capsys):
    code, out, _ = _run(
        capsys, "--quiet", "data", "generate", "--out", str(tmp_path / "w"), "--num", "2", "--preview", "1",
        "--config", "configs/world/default.py:size=32", "--config.seed=7",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["seed"] == 7
    code, _, err = _run(capsys, "data", "generate", "--out", str(tmp_path / "x"), "--config.sized=3")
    assert code == 2
    assert "unknown config key 'sized'" in err and "size" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_data_check_prints_one_json_line(capsys):
    code, out, _ = _run(capsys, "--quiet", "data", "check", "--num", "12", "--size", "32")
    assert code == 0
    report = json.loads(out)
    assert report["target_success"] == 1.0 and report["num"] == 12


def test_verify_scores_target_and_source(tmp_path, capsys):
    sample = edits.generate_sample("train", 0, 4, edits.WorldConfig(size=64))
    image_io.write_image_atomic(tmp_path / "target.png", sample.target_image)
    image_io.write_image_atomic(tmp_path / "source.png", sample.source_image)
    scene = tmp_path / "scene.json"
    scene.write_text(sample.edit.target.to_json())
    code, out, _ = _run(capsys, "verify", "--image", str(tmp_path / "target.png"), "--target_scene", str(scene))
    assert code == 0 and json.loads(out)["success"] is True
    code, out, _ = _run(
        capsys, "verify", "--image", str(tmp_path / "source.png"), "--target_scene", sample.edit.target.to_json(),
        "--source", str(tmp_path / "source.png"),
    )  # fmt: skip
    report = json.loads(out)
    assert code == 0 and report["success"] is False and report["failed_attributes"]
    assert report["preservation_l1"] == 0.0


@pytest.mark.parametrize(
    "content, message",
    [(b"not an image", "not a readable image"), (b"", "empty file")],
)
def test_bad_image_is_a_one_line_error(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code, out, err = _run(
        capsys, "verify", "--image", str(bad), "--target_scene", '{"background": "white", "objects": []}'
    )
    assert code == 2 and out == ""
    assert message in err and "bad.png" in err and len(err.strip().splitlines()) == 1


def test_installed_console_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "editing_jax.cli", "verify", "--image", str(tmp_path / "missing.png"),
         "--target_scene", '{"background": "white", "objects": []}'],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("editing-jax: error:") and "Traceback" not in result.stderr
    assert "missing.png: no such file" in result.stderr
