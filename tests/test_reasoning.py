"""Instruction decomposition: the tag parser, the VLM reasoner against a fake server, and the exact world reasoner."""

from __future__ import annotations

import numpy as np
import pytest

from editing_jax.data.world import edits, spec
from editing_jax.rewards import mllm, reasoning
from tests.helpers.fake_chat import FakeChatServer, Reply, payload_images, user_text

FULL = (
    "<info> A white background with a red circle on the left. </info>\n"
    "<think> The instruction refers to the red circle; its color must change. </think>\n"
    "<answer> Recolor the red circle on the left blue. </answer>\n"
    "<object> blue circle, one, on the left </object>"
)

# ---------------------------------------------------------------------------------------------------------------------
# Parser.


def test_parse_full_reply():
    d = reasoning.parse_decomposition(FULL)
    assert d.ok and d.missing == () and d.unclosed == () and d.error is None
    assert d.info == "A white background with a red circle on the left."
    assert d.think.startswith("The instruction refers")
    assert d.answer == "Recolor the red circle on the left blue."
    assert d.object == "blue circle, one, on the left"
    assert d.raw == FULL
    assert d.edit_instruction("fallback") == d.answer


def test_parse_tolerates_case_whitespace_order_and_special_tokens():
    text = (
        "Sure! Here is my analysis.\n< OBJECT >blue circle</Object>\n<ANSWER>\n  Recolor   the circle\n blue.\n"
        "</ answer >  <Think>why</THINK> <info>scene</info><|im_end|><|endoftext|>"
    )
    d = reasoning.parse_decomposition(text)
    assert (d.info, d.think, d.answer, d.object) == ("scene", "why", "Recolor the circle blue.", "blue circle")
    assert d.ok


def test_parse_missing_and_empty_tags():
    d = reasoning.parse_decomposition("<info>scene</info> <think></think> <answer>do it</answer>")
    assert d.missing == ("think", "object") and not d.ok
    assert d.think == "" and d.object == ""
    nothing = reasoning.parse_decomposition("I cannot help with that.")
    assert nothing.missing == reasoning.TAGS
    assert nothing.edit_instruction("make it red") == "make it red"


def test_parse_truncated_reply_keeps_unclosed_text():
    d = reasoning.parse_decomposition("<info>scene</info><think>step one</think><answer>Recolor the red circle bl")
    assert d.answer == "Recolor the red circle bl" and d.unclosed == ("answer",)
    assert d.missing == ("object",)
    # An unclosed tag stops at the next tag.
    d = reasoning.parse_decomposition("<info>scene <think>why</think><answer>a</answer><object>o</object>")
    assert d.info == "scene" and d.unclosed == ("info",) and d.ok


def test_parse_closing_tag_without_opener():
    # Reasoning models whose chat template already opened <think>: the reply starts inside it.
    d = reasoning.parse_decomposition("the circle is red\n</think>\n<answer>a</answer><object>o</object>")
    assert d.think == "the circle is red" and d.answer == "a"
    assert d.missing == ("info",)


def test_parse_first_occurrence_wins_and_roundtrip():
    d = reasoning.parse_decomposition("<answer>first</answer> <answer>second</answer>")
    assert d.answer == "first"
    full = reasoning.parse_decomposition(FULL)
    again = reasoning.parse_decomposition(full.to_text())
    assert (again.info, again.think, again.answer, again.object) == (full.info, full.think, full.answer, full.object)
    with pytest.raises(TypeError):
        reasoning.parse_decomposition(None)


def test_prompt_names_every_tag():
    for tag in reasoning.TAGS:
        assert f"<{tag}>" in reasoning.DECOMPOSITION_PROMPT and f"</{tag}>" in reasoning.DECOMPOSITION_PROMPT


# ---------------------------------------------------------------------------------------------------------------------
# MLLMReasoner against a fake server.


def test_mllm_reasoner_sends_prompt_image_and_instruction():
    def respond(payload, index):
        instruction = user_text(payload).removeprefix("Instruction: ")
        if instruction == "fail":
            return Reply(status=400, raw_body=b"bad request")
        return FULL.replace("Recolor the red circle on the left blue.", f"Explicit: {instruction}")

    images = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    with FakeChatServer(respond) as server:
        client = mllm.ChatClient(server.url, model="reasoner", max_retries=0, trust_env=False)
        out = reasoning.MLLMReasoner(client)(images, ["make it blue", "fail", "add a square"])
        assert [d.answer for d in out] == ["Explicit: make it blue", "", "Explicit: add a square"]
        assert out[0].ok and out[2].ok
        assert not out[1].ok and "HTTP 400" in out[1].error
        assert out[1].edit_instruction("fail") == "fail"
        with pytest.raises(mllm.ChatError, match="HTTP 400"):
            reasoning.decompose(client, images[1:2], ["fail"], raise_on_error=True)
    payload = next(p for p in server.payloads if user_text(p).endswith("add a square"))
    assert payload["messages"][0] == {"role": "system", "content": reasoning.DECOMPOSITION_PROMPT}
    (image,) = payload_images(payload)
    np.testing.assert_array_equal(image, images[2])


# ---------------------------------------------------------------------------------------------------------------------
# WorldReasoner.


@pytest.fixture(scope="module")
def world_examples():
    config = edits.WorldConfig(size=32)
    examples = [
        edits.generate_sample(split, 5, i, config).to_example() for split in ("train", "test") for i in range(40)
    ]
    assert {e["edit_type"] for e in examples} == set(spec.EDIT_TYPES)
    return examples


def _expected_mentions(example) -> list[str]:
    """Phrases the explicit instruction must contain for the edit to be unambiguous and exact."""
    source = spec.Scene.from_json(example["source_scene"])
    target = spec.Scene.from_json(example["target_scene"])
    removed = [o for o in source.objects if o not in target.objects]
    added = [o for o in target.objects if o not in source.objects]
    kind = example["edit_type"]
    if kind == "identity":
        return ["Keep the image"]
    if kind == "background":
        return [source.background, target.background]
    if kind == "add":
        return [added[0].describe(), spec.CELL_PHRASES[added[0].cell]]
    if kind == "count":
        changed = removed or added
        return [changed[0].name] + [spec.CELL_PHRASES[o.cell] for o in changed]
    old, new = removed[0], (added[0] if added else None)
    mentions = [old.describe(), spec.CELL_PHRASES[old.cell]]  # The referenced object, fully described and located.
    if kind == "color":
        mentions.append(new.color)
    elif kind == "replace":
        mentions.append(new.describe())
    elif kind == "move":
        mentions.append(spec.CELL_PHRASES[new.cell].split(" ", 2)[2])
    elif kind == "resize":
        mentions.append(new.size)
    elif kind == "style":
        mentions.append("outline" if new.style == "outline" else "filled")
    return mentions


def test_world_reasoner_is_complete_exact_and_deterministic(world_examples):
    reasoner = reasoning.WorldReasoner()
    instructions = [e["instruction"] for e in world_examples]
    out = reasoner(None, instructions, world_examples)
    assert out == reasoner(None, instructions, world_examples)
    for d, example in zip(out, world_examples, strict=True):
        assert d.ok, (example["instruction"], d)
        source = spec.Scene.from_json(example["source_scene"])
        for obj in source.objects:  # <info> lists every object with its attributes and position.
            assert f"{obj.describe()} {spec.CELL_PHRASES[obj.cell]}" in d.info
        assert source.background in d.info
        assert example["instruction"] in d.think
        for phrase in _expected_mentions(example):
            assert phrase in d.answer, (example["edit_type"], phrase, d.answer)
        if example["edit_type"] == "identity":
            assert d.object == "none"
        else:
            assert d.object == example["object_name"]


def test_world_reasoner_names_distractors(world_examples):
    found = 0
    for example in world_examples:
        if example["edit_type"] in ("identity", "background", "add"):
            continue
        source = spec.Scene.from_json(example["source_scene"])
        color, kind = example["object_name"].split(" ")
        distractors = [
            o for o in source.objects if o.name != example["object_name"] and (o.color == color or o.kind == kind)
        ]
        d = reasoning.WorldReasoner()(None, [example["instruction"]], [example])[0]
        for obj in distractors:
            assert f"the {obj.describe()} {spec.CELL_PHRASES[obj.cell]}" in d.think
            found += 1
    assert found > 5  # The world generates distractors often; make sure the branch ran.


def test_world_reasoner_text_roundtrips_through_the_parser(world_examples):
    example = world_examples[0]
    text = reasoning.WorldReasoner().text(example["instruction"], example)
    parsed = reasoning.parse_decomposition(text)
    assert parsed.ok and reasoning.parse_decomposition(parsed.to_text()).answer == parsed.answer


def test_world_reasoner_needs_scene_graphs():
    with pytest.raises(KeyError, match="source_scene"):
        reasoning.WorldReasoner()(None, ["x"], [{"edit_type": "color"}])
    with pytest.raises(ValueError, match="2 instructions but 1 infos"):
        reasoning.WorldReasoner()(None, ["x", "y"], [{}])
