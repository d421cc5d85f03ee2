"""Rewards: the RewardFn contract, the exact world reward, the MLLM score parser, the chat client and MLLMReward."""

from __future__ import annotations

import dataclasses
import math
import socket
import time

import numpy as np
import pytest

from editing_jax.data.world import edits, render, spec
from editing_jax.rewards import base, mllm, world
from tests.helpers.fake_chat import FakeChatServer, Reply, payload_images, user_text

# ---------------------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def world_batch():
    """40 world samples covering every edit type: (examples, source [B, S, S, 3], target [B, S, S, 3])."""
    samples = [edits.generate_sample("train", 3, i, edits.WorldConfig(size=48)) for i in range(40)]
    examples = [s.to_example() for s in samples]
    assert {e["edit_type"] for e in examples} == set(spec.EDIT_TYPES)
    source = np.stack([s.source_image for s in samples])
    target = np.stack([s.target_image for s in samples])
    return examples, source, target


def _instructions(examples):
    return [e["instruction"] for e in examples]


def _find_sample(edit_type: str, min_objects: int = 1) -> dict:
    for index in range(500):
        example = edits.generate_sample("train", 7, index, edits.WorldConfig(size=48)).to_example()
        scene = spec.Scene.from_json(example["source_scene"])
        if example["edit_type"] == edit_type and len(scene.objects) >= min_objects:
            return example
    raise AssertionError(f"no {edit_type} sample with {min_objects} objects")


def _client(server: FakeChatServer, **kwargs) -> mllm.ChatClient:
    options = dict(model="judge", timeout_s=5.0, max_retries=2, backoff_s=0.01, jitter=0.0, trust_env=False)
    options.update(kwargs)
    return mllm.ChatClient(server.url, **options)


# ---------------------------------------------------------------------------------------------------------------------
# RewardFn contract.


def test_check_batch_accepts_valid_and_names_the_problem():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    assert base.check_batch(images, images, ["a", "b"], [{}, {}]) == 2
    with pytest.raises(ValueError, match="uint8"):
        base.check_batch(images, images.astype(np.float32), ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        base.check_batch(images[0], images[0], ["a"], [{}])
    with pytest.raises(ValueError, match="shapes differ"):
        base.check_batch(images, images[:1], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="2 instructions and 1 infos"):
        base.check_batch(images, images, ["a", "b"], [{}])
    with pytest.raises(TypeError, match="single string"):
        base.check_batch(images, images, "ab", [{}, {}])
    with pytest.raises(TypeError, match=r"infos\[1\]"):
        base.check_batch(images, images, ["a", "b"], [{}, "x"])


def test_check_outputs_requires_reward_and_batch_shape():
    assert base.check_outputs({"reward": [1, 2]}, 2)["reward"].dtype == np.float32
    with pytest.raises(ValueError, match="'reward'"):
        base.check_outputs({"alignment": np.zeros(2)}, 2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        base.check_outputs({"reward": np.zeros((2, 1))}, 2)


def test_rewards_implement_the_protocol():
    assert isinstance(world.WorldReward(), base.RewardFn)
    client = mllm.ChatClient("http://127.0.0.1:1", model="m")
    assert isinstance(mllm.MLLMReward(client), base.RewardFn)


# ---------------------------------------------------------------------------------------------------------------------
# WorldReward.


def test_world_reward_ground_truth_target_is_maximal(world_batch):
    examples, source, target = world_batch
    out = world.WorldReward()(source, target, _instructions(examples), examples)
    assert set(out) == {"reward", *world.COMPONENTS, "success", "attribute_accuracy", "preservation_l1"}
    for key, value in out.items():
        assert value.shape == (len(examples),) and value.dtype == np.float32, key
    np.testing.assert_allclose(out["alignment"], 5.0)
    np.testing.assert_allclose(out["consistency"], 5.0)
    assert out["coherence"].min() > 4.9
    assert out["reward"].min() > 14.9 and out["reward"].max() <= 15.0
    np.testing.assert_allclose(out["reward"], out["alignment"] + out["coherence"] + out["consistency"], rtol=1e-6)
    np.testing.assert_array_equal(out["success"], 1.0)


def test_world_reward_unedited_source_loses_alignment_only(world_batch):
    examples, source, target = world_batch
    reward = world.WorldReward()
    edited_out = reward(source, target, _instructions(examples), examples)
    noop_out = reward(source, source, _instructions(examples), examples)
    identity = np.asarray([e["edit_type"] == "identity" for e in examples])
    assert identity.any() and (~identity).any()
    # Doing nothing passes none of the edited checks: alignment 0, while coherence and consistency stay perfect.
    np.testing.assert_allclose(noop_out["alignment"][~identity], 0.0)
    np.testing.assert_allclose(noop_out["alignment"][identity], 5.0)
    np.testing.assert_allclose(noop_out["consistency"], 5.0)
    assert np.all(noop_out["reward"][~identity] < edited_out["reward"][~identity] - 4.9)
    # The 'all' mode (plain attribute accuracy) is lower for the source too, but only slightly.
    all_mode = world.WorldReward(alignment_mode="all")(source, source, _instructions(examples), examples)
    assert np.all(all_mode["alignment"][~identity] < 5.0)
    assert all_mode["alignment"][~identity].mean() > 2.5


def test_world_reward_noise_is_incoherent_and_inconsistent(world_batch):
    examples, source, _ = world_batch
    noise = np.random.default_rng(0).integers(0, 256, source.shape, dtype=np.uint8)  # [B, S, S, 3]
    out = world.WorldReward()(source, noise, _instructions(examples), examples)
    np.testing.assert_allclose(out["consistency"], 0.0)
    assert out["coherence"].max() < 1.0
    assert out["reward"].max() < 5.0
    np.testing.assert_array_equal(out["success"], 0.0)


def test_world_reward_consistency_follows_the_documented_mapping():
    example = _find_sample("color", min_objects=2)
    source, target = example["source_image"][None], example["target_image"][None]  # [1, S, S, 3]
    keep = ~example["edit_mask"].astype(bool)  # [S, S]
    shifted = target.astype(np.int16)
    shifted[0][keep] = np.clip(shifted[0][keep] + 12, 0, 255)
    shifted = shifted.astype(np.uint8)
    expected_l1 = np.abs(shifted.astype(np.float64) - source)[0][keep].mean() / 255.0
    for scale in (0.05, 0.1, 1.0):
        out = world.WorldReward(consistency_l1_scale=scale)(source, shifted, [example["instruction"]], [example])
        np.testing.assert_allclose(out["preservation_l1"], expected_l1, rtol=1e-4)
        np.testing.assert_allclose(out["consistency"], 5.0 * (1.0 - min(expected_l1 / scale, 1.0)), rtol=1e-4)


def test_world_reward_alignment_penalizes_breaking_kept_objects_and_wrong_targets():
    example = _find_sample("color", min_objects=3)
    source_scene = spec.Scene.from_json(example["source_scene"])
    target_scene = spec.Scene.from_json(example["target_scene"])
    size = example["source_image"].shape[0]
    edited_cell = next(o.cell for o in target_scene.objects if o not in source_scene.objects)
    bystander = next(o for o in target_scene.objects if o.cell != edited_cell)
    # Right edit, but a bystander vanished: edited checks all pass, one kept object fails.
    broken = render.render(target_scene.replace_object(bystander, None), size)
    # Wrong target: the bystander is recolored instead of the referenced object.
    new_color = next(c for c in spec.COLORS if c != bystander.color)
    wrong = render.render(source_scene.replace_object(bystander, dataclasses.replace(bystander, color=new_color)), size)
    images = np.stack([example["target_image"], broken, wrong])  # [3, S, S, 3]
    sources = np.repeat(example["source_image"][None], 3, axis=0)
    out = world.WorldReward()(sources, images, [example["instruction"]] * 3, [example] * 3)
    assert out["alignment"][0] == pytest.approx(5.0)
    assert 2.5 < out["alignment"][1] < 5.0
    assert out["alignment"][2] == pytest.approx(0.0)
    assert out["consistency"][1] < 5.0 and out["consistency"][2] < 5.0


def test_world_reward_is_deterministic_and_batch_independent(world_batch):
    examples, source, target = world_batch
    noisy = np.clip(target.astype(np.int16) + np.random.default_rng(1).integers(-20, 21, target.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    reward = world.WorldReward()
    full = reward(source, noisy, _instructions(examples), examples)
    again = reward(source, noisy, _instructions(examples), examples)
    single = [reward(source[i : i + 1], noisy[i : i + 1], [examples[i]["instruction"]], [examples[i]]) for i in (0, 7)]
    for key in full:
        np.testing.assert_array_equal(full[key], again[key])
        np.testing.assert_array_equal(full[key][[0, 7]], [s[key][0] for s in single])


def test_world_reward_accepts_scene_objects_and_dicts():
    example = _find_sample("move")
    variants = []
    for convert in (lambda s: s, spec.Scene.from_json, lambda s: spec.Scene.from_json(s).to_dict()):
        info = dict(
            example, source_scene=convert(example["source_scene"]), target_scene=convert(example["target_scene"])
        )
        variants.append(info)
    images = np.stack([example["target_image"]] * 3)
    sources = np.stack([example["source_image"]] * 3)
    out = world.WorldReward()(sources, images, [example["instruction"]] * 3, variants)
    assert out["reward"].min() > 14.9


def test_world_reward_errors():
    example = _find_sample("add")
    images = example["source_image"][None]
    reward = world.WorldReward()
    with pytest.raises(KeyError, match="edit_mask"):
        reward(images, images, ["x"], [{k: v for k, v in example.items() if k != "edit_mask"}])
    with pytest.raises(ValueError, match="edit_mask"):
        reward(images, images, ["x"], [dict(example, edit_mask=np.zeros((3, 3)))])
    with pytest.raises(ValueError, match="consistency_l1_scale"):
        world.WorldReward(consistency_l1_scale=0.0)
    with pytest.raises(ValueError, match="alignment_mode"):
        world.WorldReward(alignment_mode="edited")


# ---------------------------------------------------------------------------------------------------------------------
# Score parser.

NAN = math.nan
CANONICAL = (
    "Key elements: red circle (present), blue (present).\n"
    "Alignment Score (0-5): 4\nCoherence Score (0-5): 3.5\nStyle Score (0-5): 5\nConsistency Score (0-5): 2\n"
    "Reasons: the circle is blue but the square moved."
)

PARSE_CASES = [
    ("canonical", CANONICAL, (4, 3.5, 5, 2)),
    (
        "official 1-5 format",
        "Alignment Score (1-5): 5\nCoherence Score (1-5): 4\nStyle Score (1-5): 3\nConsistency Score (1-5): 1",
        (5, 4, 3, 1),
    ),
    ("json", '{"alignment": 4, "coherence": 3, "style": 2, "consistency": 1}', (4, 3, 2, 1)),
    (
        "fenced json with prose and varied keys",
        'Here you go:\n```json\n{"Alignment Score": "4/5", "coherence_score": 3.0, "Style (0-5)": {"score": 2},'
        ' "CONSISTENCY": [1, "mostly changed"]}\n```\nHope this helps.',
        (4, 3, 2, 1),
    ),
    (
        "nested json",
        '{"scores": {"alignment": 5, "coherence": 5}, "details": [{"style": 4}], "consistency": "3 out of 5"}',
        (5, 5, 4, 3),
    ),
    (
        "invalid json falls back to lines",
        '{"alignment": 4, "coherence": 3,}\nAlignment: 4\nCoherence: 3\nStyle: 2\nConsistency: 1',
        (4, 3, 2, 1),
    ),
    (
        "markdown bold and fractions",
        "**Alignment Score:** 4/5\n**Coherence**: 8/10\n* Style — 3.5 out of 5\n__Consistency__ = 60%",
        (4, 4, 3.5, 3),
    ),
    (
        "markdown table",
        "| Criterion | Score |\n|---|---|\n| Alignment | 4 |\n| Coherence | 3 |\n| Style | 5 |\n| Consistency | 2 |",
        (4, 3, 5, 2),
    ),
    (
        "headings with score lines",
        "### Alignment\nThe edit follows the request.\nScore: 4\n\n### Coherence\n- **Score**: 3\n"
        "### Style\nRating: 5/5\n### Consistency\nScore = 2",
        (4, 3, 5, 2),
    ),
    ("inline prose", "I rate alignment 4/5, coherence is 3, style: 5 and consistency - 2.", (4, 3, 5, 2)),
    (
        "bracketed values",
        "Alignment Score: [4]\nCoherence Score: (3)\nStyle Score: <5>\nConsistency Score: 2",
        (4, 3, 5, 2),
    ),
    (
        "range without brackets and worded ranges",
        "Alignment Score 1-5: 4\nCoherence (on a scale of 0 to 5): 3\nStyle [0-5]: 5\nConsistency Score (0–5): 2",
        (4, 3, 5, 2),
    ),
    (
        "last statement wins",
        "Alignment Score (0-5): 2\n...after a closer look...\nFinal: Alignment Score (0-5): 4\nCoherence: 3\n"
        "Style: 5\nConsistency: 2",
        (4, 3, 5, 2),
    ),
    (
        "think block then answer",
        "<think>alignment seems fine, coherence maybe</think>\nAlignment: 5\nCoherence: 4\nStyle: 4\nConsistency: 5",
        (5, 4, 4, 5),
    ),
    ("template echo is not a score", "Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z", None),
    ("digits in prose are not scores", "Alignment: the 2 circles are fine. Coherence: 3 objects are distorted.", None),
    ("empty", "", None),
    ("refusal", "I'm sorry, I can't evaluate images.", None),
    (
        "inconsistency is not consistency",
        "There is an inconsistency of 4 pixels. Alignment: 4\nCoherence: 4\nStyle: 4",
        (4, 4, 4, NAN),
    ),
    (
        "units and connectives after the score",
        "Alignment: 4 because the circle is blue\nCoherence: 3 points\nStyle: 5 stars\nConsistency: 2 as expected",
        (4, 3, 5, 2),
    ),
    ("missing field", "Alignment: 4\nCoherence: 3\nConsistency: 1", (4, 3, NAN, 1)),
    ("json nan is missing", '{"alignment": NaN, "coherence": 3, "style": 2, "consistency": 1}', (NAN, 3, 2, 1)),
    ("case and underscores", "ALIGNMENT_SCORE: 4\ncoherence score - 3\nStyle:5\nconsistency:2", (4, 3, 5, 2)),
    ("aliases", "Instruction following: 4\nCoherence: 3\nAesthetics: 5\nPreservation: 2", (4, 3, 5, 2)),
    ("unicode and emphasis", "✅ *Alignment*: `4`\n✅ Coherence: “3”\nStyle: 5 ⭐\nConsistency: 2.0", (4, 3, 5, 2)),
]


@pytest.mark.parametrize("name,text,expected", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_scores_cases(name, text, expected):
    parsed = mllm.parse_scores(text)
    expected = (NAN,) * 4 if expected is None else expected
    got = [parsed.scores[k] for k in mllm.SCORE_KEYS]
    np.testing.assert_allclose(got, expected, err_msg=name)
    assert parsed.missing == tuple(k for k, v in zip(mllm.SCORE_KEYS, expected, strict=True) if math.isnan(v))
    assert parsed.ok == (not parsed.missing)
    assert parsed.raw == text


def test_parse_scores_clips_out_of_range_and_flags_it():
    parsed = mllm.parse_scores("Alignment: 7\nCoherence: -1\nStyle: 12/10\nConsistency: 5")
    assert parsed.scores == {"alignment": 5.0, "coherence": 0.0, "style": 5.0, "consistency": 5.0}
    assert parsed.clipped == ("alignment", "coherence", "style")
    assert parsed.ok


def test_parse_scores_strict_raises_with_the_missing_keys():
    with pytest.raises(mllm.ScoreParseError, match=r"\['style'\].*Alignment"):
        mllm.parse_scores("Alignment: 4\nCoherence: 3\nConsistency: 1", strict=True)
    assert mllm.parse_scores(CANONICAL, strict=True).ok


def test_parse_scores_custom_range_and_keys():
    parsed = mllm.parse_scores("Alignment: 8/10\nCoherence: 9", keys=("alignment", "coherence"), low=1, high=10)
    assert parsed.scores == {"alignment": 8.0, "coherence": 9.0}
    with pytest.raises(ValueError, match="unknown score keys"):
        mllm.parse_scores("x", keys=("beauty",))
    with pytest.raises(TypeError):
        mllm.parse_scores(None)


def test_reward_prompt_asks_for_the_parsed_format():
    prompt = mllm.REWARD_PROMPT_TEMPLATE.format(instruction="make the red circle blue")
    assert "make the red circle blue" in prompt
    filled = prompt.replace("<score>", "3").replace("<reasons>", "ok")
    assert mllm.parse_scores(filled).scores == dict.fromkeys(mllm.SCORE_KEYS, 3.0)


# ---------------------------------------------------------------------------------------------------------------------
# ChatClient.


def test_payload_and_endpoint():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    client = mllm.ChatClient("http://h:1/", model="m", max_tokens=9, extra_body={"seed": 3, "temperature": 0.5})
    body = client.payload(mllm.ChatRequest("hello", (image, image), system="sys"))
    assert body["model"] == "m" and body["max_tokens"] == 9 and body["seed"] == 3 and body["temperature"] == 0.5
    assert body["messages"][0] == {"role": "system", "content": "sys"}
    content = body["messages"][1]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"] and content[-1]["text"] == "hello"
    decoded = payload_images(body)
    assert len(decoded) == 2 and np.array_equal(decoded[0], image)  # Lossless PNG.
    assert client.endpoint == "http://h:1/v1/chat/completions"
    assert mllm.ChatClient("https://h/v1", model="m").endpoint == "https://h/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        mllm.ChatClient("h:1", model="m")
    with pytest.raises(ValueError, match="uint8"):
        mllm.encode_png_data_url(image.astype(np.float32))


def test_complete_roundtrip_with_api_key():
    with FakeChatServer(lambda payload, index: f"echo: {user_text(payload)}") as server:
        client = _client(server, api_key="secret-token")
        assert client.complete("hi", [np.zeros((4, 4, 3), np.uint8)]) == "echo: hi"
        assert "secret-token" not in repr(client)
    assert server.headers[0]["Authorization"] == "Bearer secret-token"
    assert len(payload_images(server.payloads[0])) == 1


def test_retries_5xx_with_exponential_backoff():
    def respond(payload, index):
        return Reply(status=500, raw_body=b"overloaded") if index < 2 else Reply("ok")

    delays = []
    with FakeChatServer(respond) as server:
        client = _client(server, max_retries=3, backoff_s=0.01, sleep_fn=delays.append)
        assert client.complete("x") == "ok"
    assert len(server.payloads) == 3
    assert delays == pytest.approx([0.01, 0.02])


def test_error_after_last_retry_names_endpoint_status_and_attempts():
    delays = []
    with FakeChatServer(lambda payload, index: Reply(status=503, raw_body=b"model loading")) as server:
        client = _client(server, max_retries=2, backoff_s=1.0, max_backoff_s=1.5, sleep_fn=delays.append)
        with pytest.raises(mllm.ChatError, match=r"HTTP 503.*model loading.*\(3 attempts\)") as info:
            client.complete("x")
    assert info.value.status == 503 and info.value.attempts == 3
    assert server.url in str(info.value)
    assert len(server.payloads) == 3
    assert delays == [1.0, 1.5]  # Capped at max_backoff_s.


def test_429_honours_retry_after():
    def respond(payload, index):
        return Reply(status=429, headers={"Retry-After": "0.3"}, raw_body=b"slow down") if index == 0 else "ok"

    delays = []
    with FakeChatServer(respond) as server:
        assert _client(server, backoff_s=0.01, sleep_fn=delays.append).complete("x") == "ok"
    assert delays == pytest.approx([0.3])


def test_client_errors_are_not_retried():
    with FakeChatServer(lambda payload, index: Reply(status=400, raw_body=b'{"error": "bad image"}')) as server:
        with pytest.raises(mllm.ChatError, match=r"HTTP 400.*bad image.*\(1 attempt\)") as info:
            _client(server).complete("x")
    assert info.value.status == 400 and len(server.payloads) == 1


def test_malformed_body_is_a_clear_error():
    with FakeChatServer(lambda payload, index: Reply(raw_body=b"<html>gateway</html>")) as server:
        with pytest.raises(mllm.ChatError, match="not a chat completion.*gateway"):
            _client(server).complete("x")
    assert len(server.payloads) == 1


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "Alignment: 4"}, {"type": "image_url"}, {"type": "text", "text": "\nStyle: 3"}]
    with FakeChatServer(lambda payload, index: Reply(text=parts)) as server:
        assert _client(server).complete("x") == "Alignment: 4\nStyle: 3"


def test_timeout_is_retried_then_reported():
    with FakeChatServer(lambda payload, index: Reply("late", delay_s=1.0)) as server:
        client = _client(server, timeout_s=0.15, max_retries=1, backoff_s=0.0)
        start = time.monotonic()
        with pytest.raises(mllm.ChatError, match=r"timed out after 0.15 s \(2 attempts\)"):
            client.complete("x")
        assert time.monotonic() - start < 0.9
    assert len(server.payloads) == 2


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    delays = []
    url = f"http://127.0.0.1:{port}"
    client = mllm.ChatClient(
        url, model="m", max_retries=2, backoff_s=0.5, jitter=0.0, trust_env=False, sleep_fn=delays.append
    )
    with pytest.raises(mllm.ChatError, match=r"connection error.*\(3 attempts\)") as info:
        client.complete("x")
    assert info.value.status is None and delays == [0.5, 1.0]


def test_batch_keeps_order_and_bounds_concurrency():
    with FakeChatServer(lambda payload, index: Reply(f"re: {user_text(payload)}", delay_s=0.05)) as server:
        client = _client(server, max_concurrency=3)
        requests = [mllm.ChatRequest(f"q{i}") for i in range(10)]
        assert client.complete_batch(requests) == [f"re: q{i}" for i in range(10)]
    assert 2 <= server.max_in_flight <= 3
    assert client.complete_batch([]) == []


def test_batch_failure_raises_or_is_returned_in_place():
    def respond(payload, index):
        text = user_text(payload)
        return Reply(status=400, raw_body=b"no") if text == "bad" else f"re: {text}"

    with FakeChatServer(respond) as server:
        client = _client(server, max_concurrency=2)
        requests = [mllm.ChatRequest(t) for t in ("a", "b", "bad", "c")]
        results = client.complete_batch(requests, return_exceptions=True)
        assert results[:2] == ["re: a", "re: b"] and results[3] == "re: c"
        assert isinstance(results[2], mllm.ChatError) and results[2].status == 400
        with pytest.raises(mllm.ChatError, match="request 2 of 4 failed: .*HTTP 400"):
            client.complete_batch(requests)


# ---------------------------------------------------------------------------------------------------------------------
# MLLMReward.


def _judge(scores_by_instruction):
    """A fake judge replying with canned scores per instruction (None: an unparseable reply; 'http': a 400)."""

    def respond(payload, index):
        text = user_text(payload)
        instruction = text.split('"')[1]  # The template quotes the instruction.
        scores = scores_by_instruction[instruction]
        if scores == "http":
            return Reply(status=400, raw_body=b"rejected")
        if scores is None:
            return "The edit looks nice overall."
        a, c, s, k = scores
        return f"Alignment Score (0-5): {a}\nCoherence Score (0-5): {c}\nStyle Score (0-5): {s}\nConsistency: {k}"

    return respond


def _images(batch: int, size: int = 8):
    rng = np.random.default_rng(batch)
    source = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return source, edited


def test_mllm_reward_sums_eq12_components_and_sends_edited_then_source():
    table = {"make it red": (4, 3, 5, 2), "remove the dog": (1, 2, 3, 4.5)}
    source, edited = _images(2)
    with FakeChatServer(_judge(table)) as server:
        out = mllm.MLLMReward(_client(server))(source, edited, list(table), [{}, {}])
    np.testing.assert_allclose(out["reward"], [4 + 3 + 2, 1 + 2 + 4.5])
    np.testing.assert_allclose(out["style"], [5, 3])
    np.testing.assert_array_equal(out["valid"], [1, 1])
    assert set(out) == {"reward", *mllm.SCORE_KEYS, "valid"}
    by_instruction = {user_text(p).split('"')[1]: p for p in server.payloads}
    first, second = payload_images(by_instruction["remove the dog"])
    np.testing.assert_array_equal(first, edited[1])
    np.testing.assert_array_equal(second, source[1])


def test_mllm_reward_custom_keys_like_the_official_code():
    table = {"a": (4, 3, 5, 2)}
    source, edited = _images(1)
    with FakeChatServer(_judge(table)) as server:
        reward = mllm.MLLMReward(_client(server), reward_keys=("alignment", "style", "consistency"))
        np.testing.assert_allclose(reward(source, edited, ["a"], [{}])["reward"], [11.0])


def test_mllm_reward_ignores_scores_it_does_not_sum():
    reply = "Alignment: 4\nCoherence: 3\nConsistency: 2"  # No style score at all.
    source, edited = _images(2)
    with FakeChatServer(lambda payload, index: reply) as server:
        out = mllm.MLLMReward(_client(server), missing_policy="raise")(source, edited, ["a", "b"], [{}, {}])
    np.testing.assert_allclose(out["reward"], [9.0, 9.0])
    np.testing.assert_array_equal(out["valid"], [1.0, 1.0])
    assert np.isnan(out["style"]).all()


@pytest.mark.parametrize("broken", [None, "http"])
def test_mllm_reward_missing_policies(broken):
    table = {"a": (4, 4, 4, 4), "b": broken, "c": (2, 2, 2, 2)}
    source, edited = _images(3)
    with FakeChatServer(_judge(table)) as server:
        client = _client(server, max_retries=0)
        filled = mllm.MLLMReward(client)(source, edited, list(table), [{}] * 3)
        np.testing.assert_allclose(filled["reward"], [12, 9, 6])
        np.testing.assert_array_equal(filled["valid"], [1, 0, 1])
        nan = mllm.MLLMReward(client, missing_policy="nan")(source, edited, list(table), [{}] * 3)
        assert np.isnan(nan["reward"][1]) and np.isnan(nan["alignment"][1]) and nan["reward"][0] == 12
        with pytest.raises(mllm.ScoreParseError, match="1 of 3 judge replies unusable: sample 1"):
            mllm.MLLMReward(client, missing_policy="raise")(source, edited, list(table), [{}] * 3)


def test_mllm_reward_raises_when_no_reply_is_usable():
    source, edited = _images(2)
    with FakeChatServer(_judge({"a": None, "b": None})) as server:
        with pytest.raises(mllm.ScoreParseError, match="no judge reply in the batch of 2"):
            mllm.MLLMReward(_client(server))(source, edited, ["a", "b"], [{}, {}])


def test_mllm_reward_config_errors():
    client = mllm.ChatClient("http://127.0.0.1:1", model="m")
    with pytest.raises(ValueError, match="instruction"):
        mllm.MLLMReward(client, prompt_template="rate it")
    with pytest.raises(ValueError, match="reward_keys"):
        mllm.MLLMReward(client, reward_keys=("beauty",))
    with pytest.raises(ValueError, match="missing_policy"):
        mllm.MLLMReward(client, missing_policy="zero")
