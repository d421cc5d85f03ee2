"""End-to-end tests of the flow editor through the CLI: SFT, eval / edit, GRPO and Dense GRPO, token focus, the
CogniEdit evaluation and rejection-sampling scripts, all on one tiny trained run (kept apart from
`tests/test_flow_edit.py` so that `pytest --dist loadscope` can give the two modules to different workers)."""

import json

import jax
import numpy as np
import pytest

from editing_jax import cli
from editing_jax.data import image_io
from editing_jax.data.world import edits
from editing_jax.methods import editmgt
from editing_jax.nn.transformer import DEFAULT_LORA_TARGETS
from editing_jax.train import checkpoint
from tests.helpers import load_benchmark

SHORT = ("--config.train.num_steps=2", "--config.mesh.data=1", "--config.train.tensorboard=false")
COMMON = (*SHORT, "--config.data.num_eval_examples=4", "--config.data.eval_batch_size=4")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 2-step tiny KL autoencoder run (no mid block, eval or samples: compiles faster) and a 2-step tiny flow_edit
    SFT run on top of it."""
    root = tmp_path_factory.mktemp("flow_edit")
    assert cli.main(["--quiet", "train", "--config", "configs/tokenizer/kl.py:size=32,tiny", "--workdir",
                     str(root / "kl"), "--config.train.sample_every=0", "--config.data.num_eval_examples=0",
                     "--config.model.use_mid_block=false", *SHORT]) == 0  # fmt: skip
    assert cli.main(["--quiet", "train", "--config", "configs/cogniedit/sft.py:size=32,tiny", "--workdir",
                     str(root / "sft"), f"--config.tokenizer.checkpoint={root / 'kl'}",
                     "--config.model.zero_init_modulation=false", *COMMON]) == 0  # fmt: skip
    return root


def test_sft_trains_end_to_end_from_the_cli(sft_run):
    summary = json.loads((sft_run / "sft" / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_metrics"]["loss"])
    assert 0.0 <= summary["eval"]["eval/verifier_success"] <= 1.0 and summary["eval"]["eval/preservation_l1"] >= 0.0
    assert any(key.startswith("eval/verifier_success/") for key in summary["eval"])  # per edit type
    saved = json.loads((sft_run / "sft" / "config.json").read_text())
    assert saved["method"] == "flow_edit" and json.loads(saved["tokenizer"]["model_json"])["latent_channels"] == 4
    trained = checkpoint.load_trained(sft_run / "sft")  # self-contained: autoencoder and latent statistics
    assert set(trained.model_state) == {"tokenizer", "latent_stats"} and set(trained.inference_params) == {
        "dit",
        "text_encoder",
    }
    assert float(trained.model_state["latent_stats"]["scale"]) > 0.0
    assert list((sft_run / "sft" / "samples").glob("*.png"))


def test_eval_and_edit_cli_load_a_flow_run(sft_run, tmp_path, capsys):
    checkpoint_dir = str(sft_run / "sft")
    code = cli.main(["--quiet", "eval", "--checkpoint", checkpoint_dir, "--split", "val", "--num", "4",
                     "--batch_size", "4", "--steps", "2", "--out", str(tmp_path / "eval.json")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads(out)["results"]
    assert list(results) == ["plain"] and 0.0 <= results["plain"]["verifier_success"] <= 1.0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"] == {"num_steps": 2, "guidance_scale": 0.0, "shift": 1.0, "start_time": 1.0}
    assert sum(v["num_examples"] for v in report["results"]["plain"]["per_edit_type"].values()) == 4

    sample = edits.generate_sample("test", 0, 0, edits.WorldConfig(size=32))
    image_io.write_image_atomic(tmp_path / "in.png", sample.source_image)
    edit_args = ["--quiet", "edit", "--checkpoint", checkpoint_dir, "--image", str(tmp_path / "in.png"),
                 "--instruction", sample.instruction, "--out", str(tmp_path / "out.png"), "--steps", "2"]  # fmt: skip
    code = cli.main(edit_args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["size"] == 32 and image_io.read_image(tmp_path / "out.png").shape == (32, 32, 3)
    code = cli.main([*edit_args[:-3], str(tmp_path / "img2img.png"), "--steps", "2", "--start_time", "0.5"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert not np.array_equal(image_io.read_image(tmp_path / "img2img.png"), image_io.read_image(tmp_path / "out.png"))
    code = cli.main([*edit_args, "--start_time", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "start_time must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    code = cli.main([*edit_args, "--region_hold_threshold", "0.3"])  # EditMGT-only: one-line error
    _, err = capsys.readouterr()
    assert code == 2 and "no region_hold_threshold setting" in err and len(err.strip().splitlines()) == 1


def test_cogniedit_eval_draws_only_the_named_edit_types_at_the_given_guidance(sft_run):
    cogniedit_eval = load_benchmark("cogniedit_eval")
    row = cogniedit_eval.evaluate_run(str(sft_run / "sft"), "val", 4, 4, "remove,style", 2.0, 2, start_time=0.5)
    assert set(row["per_edit_type"]) <= {"remove", "style"} and row["per_edit_type"]
    assert row["guidance_scale"] == 2.0 and row["num_steps"] == 2 and row["start_time"] == 0.5
    assert 0.0 <= row["verifier_success"] <= 1.0 and 0.0 < row["mean_brightness"] < 1.0
    assert 0.0 <= row["mean_target_fidelity"] <= 5.0
    assert len(row["per_example_success"]) == 4 and set(row["per_example_edit_type"]) == set(row["per_edit_type"])
    assert np.mean(row["per_example_success"]) == pytest.approx(row["verifier_success"])


def test_pass_at_k_counts_examples_solved_by_any_of_the_first_k_seeds():
    cogniedit_eval = load_benchmark("cogniedit_eval")
    success = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]])  # [seeds, examples]
    assert cogniedit_eval.pass_at_k(success) == [0.25, 0.5, 0.75]


def test_cogniedit_eval_seeds_edit_from_new_noises_and_report_pass_at_k(sft_run):
    cogniedit_eval = load_benchmark("cogniedit_eval")
    editor, batches = cogniedit_eval.load_run(str(sft_run / "sft"), "val", 4, 4)
    row = cogniedit_eval.score_run_seeds(str(sft_run / "sft"), editor, batches, steps=2, seeds=3)
    assert row == {**cogniedit_eval.score_run(str(sft_run / "sft"), editor, batches, steps=2), **row}  # seed 0
    seed1 = cogniedit_eval.score_run(str(sft_run / "sft"), editor, batches, steps=2, noise_seed=1)
    assert row["success_per_seed"][1] == seed1["verifier_success"]
    assert seed1["mean_brightness"] != row["mean_brightness"]  # other noises, other edits
    assert row["pass_at_k"][0] == row["verifier_success"] and len(row["pass_at_k"]) == 3
    assert row["pass_at_k"] == sorted(row["pass_at_k"]) and row["pass_at_k"][-1] >= max(row["success_per_seed"])


def test_grpo_and_dense_grpo_train_on_top_of_the_sft_run(sft_run, capsys):
    # LoRA-only params, an on-policy ratio of 1, a world reward. Dense GRPO replays each rollout twice (steps 1-2
    # share one, step 3 collects the next): the buffer is sharded, checkpointed and on-policy again at step 3.
    # Flow-GRPO puts its adapters on the layers `model.lora_targets` names, here one attention and one MLP layer.
    for name, extra in (
        ("grpo", ("--config.model.lora_targets=('to_q', 'proj_mlp')",)),
        ("dense_grpo", ("--config.grpo.updates_per_rollout=2", "--config.train.num_steps=3")),
    ):
        code = cli.main(["--quiet", "train", "--config", f"configs/cogniedit/{name}.py:tiny", "--workdir",
                         str(sft_run / name), f"--config.init_from={sft_run / 'sft'}", *COMMON, *extra])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        metrics = summary["final_metrics"]
        assert summary["compile"]["num_params"] < 10_000  # adapters only (the tiny DiT has ~60 k params)
        assert 0.0 <= metrics["reward"] <= 15.0 and metrics["log_ratio_abs"] < 1e-3
        assert 0.0 <= summary["eval"]["eval/verifier_success"] <= 1.0
        adapted = {path[-2].key for path, _ in jax.tree_util.tree_leaves_with_path(
            checkpoint.load_trained(sft_run / name).params["lora"])}  # fmt: skip
        assert adapted == ({"to_q", "proj_mlp"} if name == "grpo" else set(DEFAULT_LORA_TARGETS))


def test_dense_grpo_with_token_focus_trains_and_edits(sft_run, tmp_path, capsys):
    # The focus modules train with the adapters (gate 1: the paper's hard replacement, so they get gradient; the SFT
    # fixture skips adaLN-Zero, else 2 steps leave every block gated off and the velocity blind to the text; Adam's
    # eps is lowered so that any nonzero gradient moves the gate), and `eval` loads the GRPO run as an editor.
    workdir = sft_run / "dense_focus"
    code = cli.main(["--quiet", "train", "--config", "configs/cogniedit/dense_grpo.py:tiny,focus", "--workdir",
                     str(workdir), f"--config.init_from={sft_run / 'sft'}", "--config.model.token_focus_gate_init=1",
                     "--config.optimizer.learning_rate=1e-2", "--config.optimizer.eps=1e-30", *COMMON])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    trained = checkpoint.load_trained(workdir)
    focus = trained.params["focus"]
    assert set(focus) == {"token_focus_0", "token_focus_1"}  # the tiny DiT's two blocks
    gates = [float(focus[name]["gate"]) for name in focus]
    assert all(abs(gate - 1.0) > 1e-4 for gate in gates), gates  # the focus modules received gradient

    code = cli.main(["--quiet", "eval", "--checkpoint", str(workdir), "--split", "val", "--num", "4", "--batch_size",
                     "4", "--steps", "2", "--out", str(tmp_path / "eval.json")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 0.0 <= json.loads(out)["results"]["plain"]["verifier_success"] <= 1.0

    # The Fig. 7 analysis script: one row per focus layer, windows inside the real text.
    analysis = load_benchmark("token_focus_analysis")
    result = analysis.analyze(str(workdir), "val", 4, 4, [0.5])
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    for row in result["layers"]:
        assert sum(row["start_histogram"]) == 4 and 0.0 <= row["keyword_overlap"] <= 1.0
        assert 0.0 < row["keyword_importance_uniform"] < 1.0


def test_rejection_sampling_keeps_each_examples_first_accepted_edit(sft_run, monkeypatch):
    rejection_samples = load_benchmark("rejection_samples")
    cogniedit_eval = load_benchmark("cogniedit_eval")
    editor, batches = cogniedit_eval.load_run(str(sft_run / "sft"), "train", 6, 3)
    calls = []

    def accept_by_pattern(outputs, batch):  # call c accepts example j of its batch when (j + c) % 3 == 0
        c = len(calls)
        calls.append(outputs["images"])
        return {"success": np.array([(j + c) % 3 == 0 for j in range(len(outputs["images"]))], float)}

    monkeypatch.setattr(editmgt, "score_edits", accept_by_pattern)
    result = rejection_samples.collect(editor, batches, seeds=2, progress=False)
    assert len(calls) == 4  # 2 batches x 2 noises: no batch was all accepted after its first noise
    # batch 0: call 0 accepts example 0, call 1 example 2; batch 1: call 2 accepts 1, call 3 accepts 0.
    np.testing.assert_array_equal(result["accepted"], [True, False, True, True, True, False])
    np.testing.assert_array_equal(result["success"][:, :3], [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(result["images"][0], calls[0][0])
    np.testing.assert_array_equal(result["images"][2], calls[1][2])
    np.testing.assert_array_equal(result["images"][3], calls[3][0])  # batch 1's first acceptance of example 0
    np.testing.assert_array_equal(result["images"][4], calls[2][1])
    assert not result["images"][1].any()
    assert not np.array_equal(calls[0], calls[1])  # the second noise edits differently
    counts = rejection_samples.report(result)
    assert counts["num_accepted"] == 4 and counts["pass_at_k"] == [2 / 6, 4 / 6]
    assert sum(n for n, _ in counts["accepted_per_edit_type"].values()) == 4


def test_sft_trains_on_self_samples_from_the_rejection_script(sft_run, monkeypatch, capsys):
    rejection_samples = load_benchmark("rejection_samples")
    calls = []
    monkeypatch.setattr(editmgt, "score_edits",
                        lambda outputs, batch: calls.append(1) or {"success": np.ones(len(outputs["images"]))})  # fmt: skip
    own, world = sft_run / "own.npz", sft_run / "world.npz"
    monkeypatch.setattr("sys.argv", ["rejection_samples.py", "--run", str(sft_run / "sft"), "--num", "5",
                                     "--seeds", "2", "--batch_size", "4", "--out", str(own),
                                     "--out_ground_truth", str(world)])  # fmt: skip
    rejection_samples.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_accepted"] == 5 and report["pass_at_k"] == [1.0, 1.0]
    assert len(calls) == 2  # two batches, each done after its first noise
    from editing_jax.data import self_samples

    source = self_samples.SelfSampleSource(own)
    np.testing.assert_array_equal(source.indices, np.arange(5))
    assert source.own_targets and not self_samples.SelfSampleSource(world).own_targets
    monkeypatch.undo()  # the run's own evaluation uses the real verifier
    code = cli.main(["--quiet", "train", "--config", "configs/cogniedit/sft.py:size=32,tiny", "--workdir",
                     str(sft_run / "rft"), f"--config.init_from={sft_run / 'sft'}", "--config.data.source=self_samples",
                     f"--config.data.data_dir={own}", f"--config.tokenizer.checkpoint={sft_run / 'kl'}",
                     *COMMON])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
