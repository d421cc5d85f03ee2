"""Tests of the synthetic editing world: generator invariants, renderer, verifier exactness and robustness."""

import collections
import dataclasses

import numpy as np
import pytest

from editing_jax.data.world import check, edits, render, spec, verifier

NUM = 150


@pytest.fixture(scope="module", params=[32, 64], ids=["32px", "64px"])
def samples(request):
    config = edits.WorldConfig(size=request.param)
    return [edits.generate_sample("train", 0, i, config) for i in range(NUM)]


def test_generation_is_deterministic_and_seed_dependent():
    config = edits.WorldConfig(size=32)
    a = edits.generate_sample("train", 3, 17, config)
    b = edits.generate_sample("train", 3, 17, config)
    np.testing.assert_array_equal(a.source_image, b.source_image)
    np.testing.assert_array_equal(a.target_image, b.target_image)
    assert a.instruction == b.instruction
    others = [edits.generate_edit("train", 4, 17, config), edits.generate_edit("val", 3, 17, config)]
    assert all(o.source != a.edit.source or o.instruction != a.instruction for o in others)


def test_sample_fields_are_consistent(samples):
    for sample in samples:
        example = sample.to_example()
        size = sample.source_image.shape[0]
        assert example["source_image"].shape == (size, size, 3) and example["source_image"].dtype == np.uint8
        assert example["edit_mask"].shape == (size, size)
        start, end = example["keyword_span"]
        assert example["instruction"][start:end] == example["keyword"]
        # The edit mask is exactly where the images differ.
        differs = np.any(sample.source_image != sample.target_image, axis=-1)
        np.testing.assert_array_equal(differs, sample.edit_mask)
        if sample.edit.edit_type == "identity":
            assert not sample.edit_mask.any()
        else:
            assert sample.edit_mask.any(), sample.instruction
        # Changed pixels lie inside the edited object(s) (or the background, for background edits).
        assert not (sample.edit_mask & ~sample.object_mask).any(), sample.instruction
        assert spec.Scene.from_json(example["target_scene"]) == sample.edit.target
        assert len(sample.edit.source.objects) <= spec.MAX_OBJECTS
        assert len(sample.edit.target.objects) <= spec.MAX_OBJECTS


def test_every_edit_type_is_generated_with_several_paraphrases():
    config = edits.WorldConfig(size=32)
    phrasings = collections.defaultdict(set)
    for i in range(600):
        edit = edits.generate_edit("train", 1, i, config)
        template = edit.instruction.replace(edit.keyword, "{}") if edit.keyword else edit.instruction
        phrasings[edit.edit_type].add(template.split(" ")[0] + " " + template.split(" ")[-1])
    assert set(phrasings) == set(spec.EDIT_TYPES)
    assert all(len(p) >= 2 for p in phrasings.values()), phrasings


def test_referents_are_unique_and_distractors_exist():
    config = edits.WorldConfig(size=32)
    with_distractor = 0
    for i in range(300):
        edit = edits.generate_edit("train", 2, i, config)
        if edit.edit_type in ("count", "add", "background", "identity"):
            continue
        (obj,) = edit.edited_source
        assert edit.source.find(obj.color, obj.kind) == [obj]
        others = [o for o in edit.source.objects if o != obj]
        with_distractor += any(o.kind == obj.kind or o.color == obj.color for o in others)
    assert with_distractor > 50


def test_held_out_compositions_split():
    config = edits.WorldConfig(size=32)
    held = set(spec.HELD_OUT_COMPOSITIONS)
    for split in ("train", "val"):
        for i in range(200):
            edit = edits.generate_edit(split, 0, i, config)
            assert not spec.compositions([edit.source, edit.target]) & held
    for i in range(200):
        edit = edits.generate_edit("test", 0, i, config)
        assert spec.compositions([edit.source, edit.target]) & held


def test_edit_types_config_restricts_generation():
    config = edits.WorldConfig(size=32, edit_types=("color", "remove"))
    types = {edits.generate_edit("train", 0, i, config).edit_type for i in range(50)}
    assert types == {"color", "remove"}
    with pytest.raises(ValueError, match="edit_types"):
        edits.WorldConfig(edit_types=("paint",))


def test_repeating_an_edit_type_oversamples_it():
    config = edits.WorldConfig(size=32, edit_types=("color", "color", "color", "remove"))
    types = [edits.generate_edit("train", 0, i, config).edit_type for i in range(200)]
    assert 0.65 < types.count("color") / len(types) < 0.85  # 3/4 expected; 1/2 if repeats were collapsed


@pytest.mark.parametrize("size", [24, 33, 48, 96])
def test_render_any_square_size_roundtrips_through_verifier(size):
    config = edits.WorldConfig(size=size)
    for i in range(20):
        sample = edits.generate_sample("val", 0, i, config)
        assert sample.target_image.shape == (size, size, 3)
        assert verifier.parse(sample.target_image).scene == dataclasses.replace(sample.edit.target, position_free=None)


def test_renderer_is_an_alpha_blend_of_exact_colors():
    scene = spec.Scene("white", (spec.SceneObject("center", "square", "blue", "large", "filled"),))
    image = render.render(scene, 64)
    center = image[32, 32]
    np.testing.assert_array_equal(center, spec.OBJECT_COLORS["blue"])
    np.testing.assert_array_equal(image[0, 0], (255, 255, 255))
    outline = spec.Scene("white", (spec.SceneObject("center", "square", "blue", "large", "outline"),))
    np.testing.assert_array_equal(render.render(outline, 64)[32, 32], (255, 255, 255))


def test_verifier_is_exact_on_clean_targets(samples):
    result = verifier.verify([s.target_image for s in samples], [s.edit.target for s in samples])
    assert result.success.mean() == 1.0, [
        (s.instruction, {k: v for k, v in a.items() if not v})
        for s, a, ok in zip(samples, result.attributes, result.success, strict=True)
        if not ok
    ]
    assert result.coherent.all()
    assert np.all(result.attribute_accuracy == 1.0)


def test_unedited_source_fails_the_target(samples):
    edited = [s for s in samples if s.edit.edit_type != "identity"]
    result = verifier.verify([s.source_image for s in edited], [s.edit.target for s in edited])
    assert not result.success.any()
    identity = [s for s in samples if s.edit.edit_type == "identity"]
    assert verifier.verify([s.source_image for s in identity], [s.edit.target for s in identity]).success.all()


def test_verifier_is_robust_to_documented_degradation(samples):
    size = samples[0].target_image.shape[0]
    degraded = [check.degrade(s.target_image, size * check.DEFAULT_BLUR_PER_PIXEL, 85) for s in samples]
    result = verifier.verify(degraded, [s.edit.target for s in samples])
    assert result.success.mean() >= 0.97


def test_verifier_detects_wrong_attributes():
    base = spec.Scene(
        "gray",
        (
            spec.SceneObject("top-left", "circle", "red", "large", "filled"),
            spec.SceneObject("bottom", "triangle", "green", "small", "outline"),
        ),
    )
    wrong = {
        "top-left.color": base.replace_object(base.objects[0], dataclasses.replace(base.objects[0], color="orange")),
        "top-left.kind": base.replace_object(base.objects[0], dataclasses.replace(base.objects[0], kind="square")),
        "bottom.size": base.replace_object(base.objects[1], dataclasses.replace(base.objects[1], size="large")),
        "bottom.style": base.replace_object(base.objects[1], dataclasses.replace(base.objects[1], style="filled")),
        "background": dataclasses.replace(base, background="striped"),
    }
    for key, scene in wrong.items():
        result = verifier.verify([render.render(scene, 32)], [base])
        failed = {k for k, v in result.attributes[0].items() if not v}
        assert failed == {key}, (key, failed)
        assert not result.success[0]
    moved = base.replace_object(base.objects[0], dataclasses.replace(base.objects[0], cell="center"))
    failed = {k for k, v in verifier.verify([render.render(moved, 32)], [base]).attributes[0].items() if not v}
    assert "top-left.present" in failed and "no_extra_objects" in failed


def test_count_targets_accept_any_positions():
    group = ("blue", "square")
    target = spec.Scene(
        "white",
        (
            spec.SceneObject("top-left", "square", "blue", "small", "filled"),
            spec.SceneObject("top", "square", "blue", "small", "filled"),
            spec.SceneObject("bottom", "circle", "red", "large", "filled"),
        ),
        position_free=group,
    )
    elsewhere = spec.Scene(
        "white",
        (
            spec.SceneObject("right", "square", "blue", "small", "filled"),
            spec.SceneObject("center", "square", "blue", "small", "filled"),
            spec.SceneObject("bottom", "circle", "red", "large", "filled"),
        ),
    )
    assert verifier.verify([render.render(elsewhere, 64)], [target]).success[0]
    three = elsewhere.replace_object(None, spec.SceneObject("left", "square", "blue", "small", "filled"))
    assert not verifier.verify([render.render(three, 64)], [target]).success[0]


def test_stray_blob_makes_scene_incoherent():
    scene = spec.Scene("white", (spec.SceneObject("center", "circle", "red", "small", "filled"),))
    image = render.render(scene, 64).copy()
    assert verifier.parse(image).coherent
    image[2:5, 30:34] = (40, 70, 235)  # A 3x4 blob at a cell border: no object template explains it.
    parsed = verifier.parse(image)
    assert not parsed.coherent and parsed.coherence < 1.0


def test_preservation_l1_ignores_the_edit_mask():
    source = np.zeros((8, 8, 3), np.uint8)
    edited = source.copy()
    edited[:4] = 255
    mask = np.zeros((8, 8), bool)
    assert verifier.preservation_l1(edited, source, mask) == pytest.approx(0.5)
    mask[:4] = True
    assert verifier.preservation_l1(edited, source, mask) == 0.0


def test_verifier_accepts_float_images_and_rejects_bad_shapes():
    sample = edits.generate_sample("train", 0, 0, edits.WorldConfig(size=32))
    as_float = sample.target_image.astype(np.float32) / 255.0
    assert verifier.verify([as_float], [sample.edit.target.to_json()]).success[0]
    with pytest.raises(ValueError, match="square RGB"):
        verifier.parse(np.zeros((32, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="targets"):
        verifier.verify([as_float], [])


def test_check_world_reports_figures():
    report = check.check_world(num=30, size=32, seed=0)
    assert report["target_success"] == 1.0
    assert report["source_fails_min_over_types"] == 1.0
    assert report["degraded_target_success"] >= 0.9
    assert 20 < report["degraded_psnr_db"] < 60
    assert report["generate_samples_per_s"] > 0


def test_reading_order_count_placement_changes_only_where_count_targets_put_their_copies():
    canonical = edits.WorldConfig(size=32, count_placement="reading_order")
    counts = 0
    for index in range(80):
        plain, ordered = edits.generate_edit("train", 0, index), edits.generate_edit("train", 0, index, canonical)
        assert (ordered.edit_type, ordered.source, ordered.instruction) == (plain.edit_type, plain.source,
                                                                            plain.instruction)  # fmt: skip
        if plain.edit_type != "count":
            assert ordered == plain
            continue
        counts += 1
        group = ordered.target.position_free
        members = [o.cell for o in ordered.source.objects if o.composition == group]
        wanted = [o.cell for o in ordered.target.objects if o.composition == group]
        others = {o.cell for o in ordered.source.objects if o.composition != group}
        assert len(wanted) == len([o for o in plain.target.objects if o.composition == group])
        if len(wanted) < len(members):  # shrink: the first members in reading order stay
            assert wanted == members[: len(wanted)]
        else:  # grow: members stay, new copies fill the first empty cells in reading order
            empty = [c for c in spec.CELLS if c not in others and c not in members]
            assert wanted == sorted(members + empty[: len(wanted) - len(members)], key=spec.CELLS.index)
        sample = edits.render_edit(ordered, 32)
        assert verifier.verify([sample.target_image], [ordered.target]).success[0]
    assert counts >= 4
    with pytest.raises(ValueError, match="count_placement must be one of"):
        edits.WorldConfig(count_placement="left_to_right")


def test_object_counts_draw_scene_sizes_and_the_uniform_list_is_the_default_world():
    uniform = edits.WorldConfig(size=32, object_counts=(1, 2, 3, 4))
    no_count = tuple(t for t in spec.EDIT_TYPES if t != "count")  # a full scene has no room for more copies
    crowded = edits.WorldConfig(size=32, object_counts=(4,), edit_types=no_count)
    sizes = collections.Counter()
    for index in range(60):
        plain = edits.generate_edit("train", 0, index)
        assert edits.generate_edit("train", 0, index, uniform) == plain  # same random stream, bit for bit
        edit = edits.generate_edit("train", 0, index, crowded)
        sizes[edit.edit_type == "add", len(edit.source.objects)] += 1
    # Adds need a free cell, so they take the largest allowed count below MAX_OBJECTS.
    assert set(sizes) == {(False, spec.MAX_OBJECTS), (True, spec.MAX_OBJECTS - 1)}
    with pytest.raises(RuntimeError, match="could not generate a count edit .* object_counts"):
        edits.generate_edit("train", 0, 0, edits.WorldConfig(size=32, object_counts=(4,), edit_types=("count",)))
    with pytest.raises(ValueError, match="object_counts must lie in"):
        edits.WorldConfig(object_counts=(0, 2))
