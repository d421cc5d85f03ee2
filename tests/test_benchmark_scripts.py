"""Measurement helpers of benchmarks/ scripts whose numbers go into docs/RESULTS.md."""

import importlib.util

import numpy as np

from editing_jax.data.world import spec


def _load(name: str):
    module_spec = importlib.util.spec_from_file_location(name, f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_changed_pixel_colors_sorts_changed_pixels_by_the_output_color():
    failure_breakdown = _load("failure_breakdown")
    white, red, blue, green = (np.asarray(c, np.uint8) for c in ((255, 255, 255), spec.OBJECT_COLORS["red"],
                                                                  spec.OBJECT_COLORS["blue"], spec.OBJECT_COLORS["green"]))  # fmt: skip
    source = np.broadcast_to(white, (4, 4, 3)).copy()
    source[:2, :2] = red  # a red object, recolored to blue: 4 changed pixels
    target = source.copy()
    target[:2, :2] = blue
    output = source.copy()  # kept red at (0, 0)
    output[0, 1] = blue  # right
    output[1, 0] = white  # erased
    output[1, 1] = green  # another object color
    output[3, 3] = green  # outside the change: not counted
    counts = failure_breakdown.changed_pixel_colors(source, target, output)
    assert dict(counts) == {"target": 1, "source": 1, "background": 1, "other_object": 1}
    assert sum(failure_breakdown.changed_pixel_colors(source, source, output).values()) == 0


def test_role_probe_decodes_only_what_the_features_hold():
    probe = _load("text_color_probe")
    rng = np.random.default_rng(0)
    labels, other = rng.integers(0, 8, 600), rng.integers(0, 8, 600)
    features = np.concatenate([np.eye(8)[labels] * 0.1, rng.normal(size=(600, 4))], axis=1)  # [600, 12]
    assert probe._ridge_accuracy(features[:400], labels[:400], features[400:], labels[400:]) == 1.0
    assert probe._ridge_accuracy(features[:400], other[:400], features[400:], other[400:]) < 0.3  # chance 1/8
    np.testing.assert_allclose(probe._variance_share(np.eye(8)[labels], labels), 1.0)
    assert probe._variance_share(features, labels) < 0.05  # the label lives in low-variance features


def test_hold_map_probe_counts_tokens_that_must_change_and_must_keep():
    probe = _load("hold_map_probe")
    target_changed = np.asarray([[[True, True], [False, False]]])  # [1, 2, 2]
    hold_map = np.asarray([[[0.9, 0.7], [0.2, 0.6]]])
    output_changed = np.asarray([[[True, False], [False, True]]])
    held = np.asarray([[[False, False], [True, False]]])
    summary = probe.summarize(probe.token_stats(target_changed, hold_map, output_changed, held))
    assert summary["must_change_share"] == 0.5 and summary["held_share"] == 0.25
    np.testing.assert_allclose(summary["map_on_must_change"], 0.8)
    np.testing.assert_allclose(summary["map_on_must_keep"], 0.4)
    assert summary["must_keep_changed_share"] == 0.5  # the must-keep token at (1, 1) was changed
    assert np.isnan(probe.summarize(probe.token_stats(~target_changed | True, hold_map, output_changed, held))[
        "map_on_must_keep"])  # fmt: skip


def test_grounding_sorts_objects_into_referent_distractor_and_unrelated():
    grounding = _load("mgt_grounding")
    red_circle = spec.SceneObject(cell="top-left", kind="circle", color="red", size="large", style="filled")
    red_square = spec.SceneObject(cell="center", kind="square", color="red", size="small", style="filled")
    blue_circle = spec.SceneObject(cell="bottom", kind="circle", color="blue", size="small", style="outline")
    green_diamond = spec.SceneObject(cell="right", kind="diamond", color="green", size="large", style="filled")
    source = spec.Scene(background="white", objects=(red_circle, red_square, blue_circle, green_diamond))
    removed = spec.Scene(background="white", objects=(red_square, blue_circle, green_diamond))
    roles = grounding.object_roles(source, removed)
    assert roles == {"referent": [red_circle], "distractor": [red_square, blue_circle], "unrelated": [green_diamond]}
    assert grounding.object_roles(source, source)["referent"] == []
    pixels = np.zeros((8, 8), bool)
    pixels[5, 2] = True
    np.testing.assert_array_equal(np.argwhere(grounding.token_mask(pixels, 4)), [[2, 1]])
