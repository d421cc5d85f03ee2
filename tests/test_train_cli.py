"""End-to-end `editing-jax train` runs on the tiny tokenizer configs."""

import json

import pytest

from editing_jax import cli


def _train(capsys, *argv):
    code = cli.main(["--quiet", "train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_vq_tiny_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "vq"
    args = ("--config", "configs/tokenizer/vq.py:size=32,tiny", "--workdir", str(workdir),
            "--config.train.checkpoint_every=2", "--config.data.num_eval_examples=4", "--config.mesh.data=1")  # fmt: skip
    code, out, err = _train(capsys, *args, "--config.train.num_steps=2")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "eval/psnr" in summary["eval"] and "eval/verifier_success" in summary["eval"]
    assert summary["compile"]["num_devices"] == 1
    assert (workdir / "checkpoints" / "2").is_dir() and (workdir / "samples").is_dir()


def test_compile_only_prints_memory_and_flops(tmp_path, capsys):
    code, out, err = _train(
        capsys, "--config", "configs/tokenizer/kl.py:size=32,tiny", "--workdir", str(tmp_path), "--compile_only"
    )
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["per_device_flops_per_step"] > 0 and report["per_device_memory_bytes"]["temp_size_in_bytes"] > 0
    assert report["num_devices"] == 8


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--restore", "/nonexistent/ckpt"), "does not exist"),
        (("--config.model.codebook_sise=3",), "unknown config key 'model.codebook_sise'"),
        (("--config.data.source=nowhere",), "unknown data.source"),
    ],
)
def test_train_input_errors_are_one_line(tmp_path, capsys, extra, message):
    code, out, err = _train(capsys, "--config", "configs/tokenizer/vq.py:size=32,tiny", "--workdir", str(tmp_path),
                            *extra)  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
