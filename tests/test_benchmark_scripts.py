"""Measurement helpers of benchmarks/ scripts whose numbers go into docs/RESULTS.md."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from editing_jax import inference
from editing_jax.data.world import spec
from editing_jax.methods import flow_edit
from editing_jax.models.autoencoder import AutoencoderKL
from editing_jax.models.flow_dit import FlowDiT
from editing_jax.text.encoder import TextEncoder
from editing_jax.text.tokenizer import WordTokenizer
from tests.helpers import load_benchmark


def test_edited_object_outcome_tells_a_missing_an_unedited_and_a_wrongly_edited_object():
    breakdown = load_benchmark("failure_breakdown")
    red_square = spec.SceneObject("top-left", "square", "red")
    assert breakdown.edited_object_outcome(None, red_square) == "missing"
    assert breakdown.edited_object_outcome(spec.SceneObject("top-left", "square", "red"), red_square) == "unchanged"
    assert (
        breakdown.edited_object_outcome(spec.SceneObject("top-left", "circle", "red"), red_square) == "changed_wrongly"
    )
    assert breakdown.edited_object_outcome(red_square, None) == "changed_wrongly"  # drawn where nothing was


def test_changed_pixel_colors_sorts_changed_pixels_by_the_output_color():
    failure_breakdown = load_benchmark("failure_breakdown")
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
    probe = load_benchmark("text_color_probe")
    rng = np.random.default_rng(0)
    labels, other = rng.integers(0, 8, 600), rng.integers(0, 8, 600)
    features = np.concatenate([np.eye(8)[labels] * 0.1, rng.normal(size=(600, 4))], axis=1)  # [600, 12]
    assert probe._ridge_accuracy(features[:400], labels[:400], features[400:], labels[400:]) == 1.0
    assert probe._ridge_accuracy(features[:400], other[:400], features[400:], other[400:]) < 0.3  # chance 1/8
    np.testing.assert_allclose(probe._variance_share(np.eye(8)[labels], labels), 1.0)
    assert probe._variance_share(features, labels) < 0.05  # the label lives in low-variance features


def test_hold_map_probe_counts_tokens_that_must_change_and_must_keep():
    probe = load_benchmark("hold_map_probe")
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


def test_oracle_hold_reverts_exactly_the_tokens_the_target_keeps():
    probe = load_benchmark("hold_map_probe")
    source = np.asarray([[[1, 2], [3, 4]]])  # [1, 2, 2]
    target = np.asarray([[[1, 9], [3, 8]]])  # the edit changes (0, 1) and (1, 1)
    output = np.asarray([[[5, 9], [6, 7]]])  # right at (0, 1), wrong at (1, 1), broke (0, 0) and (1, 0)
    np.testing.assert_array_equal(probe.oracle_hold(output, source, target), [[[1, 9], [3, 7]]])
    np.testing.assert_array_equal(probe.oracle_hold(output, source, source), source)  # identity: all reverted
    sums = dict.fromkeys(probe.OUTCOME_SUMS, 0.0)
    probe.add_outcome(sums, np.asarray([1.0, 0.0]), np.asarray([0.2, np.nan]))
    probe.add_outcome(sums, np.asarray([1.0]), np.asarray([0.4]))
    mean = probe.outcome_mean(sums)
    np.testing.assert_allclose([mean["verifier_success"], mean["preservation_l1"]], [2 / 3, 0.3])  # NaN L1 skipped


def test_pixel_snap_reverts_only_pixels_within_the_tolerance_of_the_source():
    probe = load_benchmark("pixel_snap_probe")
    source = np.zeros((1, 1, 3, 3), np.uint8)  # [B, H, W, 3]
    images = np.asarray([[[[8, 0, 0], [0, 0, 9], [200, 10, 250]]]], np.uint8)  # max channel differences 8, 9, 250
    np.testing.assert_array_equal(probe.snap_to_source(images, source, 8)[0, 0], [[0, 0, 0], [0, 0, 9], [200, 10, 250]])
    np.testing.assert_array_equal(probe.snap_to_source(images, source, 0), images)
    np.testing.assert_array_equal(probe.snap_to_source(images, source, 255), source)
    assert probe.snap_to_source(images, source, 8).dtype == np.uint8


def test_grounding_sorts_objects_into_referent_distractor_and_unrelated():
    grounding = load_benchmark("mgt_grounding")
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


def _tiny_flow_editor(image_size: int, text_cross_source: bool = False) -> inference.Editor:
    """A flow editor with random weights: 2 double blocks with text cross-attention, a tiny frozen autoencoder."""
    autoencoder = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                use_mid_block=False, latent_channels=4)  # fmt: skip
    tokenizer = WordTokenizer(("remove", "the", *spec.COLORS, *spec.KINDS), max_length=12, num_hash_buckets=4)
    text_encoder = TextEncoder(tokenizer.vocab_size, width=16, num_layers=1, num_heads=2, max_length=12, pooled_dim=8)
    dit = FlowDiT(num_layers=2, num_single_layers=0, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                  zero_init_modulation=False, zero_init_output=False, text_cross_attention=True,
                  text_cross_source=text_cross_source)  # fmt: skip
    model = flow_edit.FlowEditor(dit, text_encoder, autoencoder, tokenizer, image_size=image_size, patch_size=2)
    rng = np.random.default_rng(0)
    # Random frozen autoencoder weights from NumPy (compiling its init is slow); latent stats: identity.
    shapes = jax.eval_shape(autoencoder.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    state = {"tokenizer": jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes),
             "latent_stats": {"shift": jnp.float32(0.0), "scale": jnp.float32(1.0)}}  # fmt: skip
    objective = flow_edit.make_objective(model, state["tokenizer"], cfg_dropout=0.0, timestep_sampling="uniform",
                                         settings=flow_edit.FlowSettings(num_steps=1),
                                         init_latent_stats=state["latent_stats"])  # fmt: skip
    text = model.prepare_batch({"instruction": np.asarray(["remove the red circle"], object)})
    text = {key: jnp.asarray(text[key]) for key in ("text_ids", "text_mask")}
    params = nn.meta.unbox(jax.jit(objective.init)(jax.random.key(1), text))["params"]
    return inference.Editor(model, params, state, ml_collections.ConfigDict({"data": {"seed": 0}}), 0)


@pytest.mark.parametrize("text_cross_source", [False, True])
def test_flow_gate_is_the_last_text_cross_gate_on_the_target_tokens_at_t_1(text_cross_source):
    grounding = load_benchmark("mgt_grounding")
    editor = _tiny_flow_editor(8, text_cross_source)
    model, params, state = editor.model, editor.params, editor.model_state
    source = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8))
    batch = model.prepare_batch(
        {"instruction": np.asarray(["remove the red circle", "remove the blue square"], object)}
    )
    ids, mask = jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"])

    gate_fn = grounding.flow_gate_fn(model)
    gate = np.asarray(gate_fn(params, state, ids, mask, source, 3))  # [2, grid, grid]
    assert gate.shape == (2, model.token_grid, model.token_grid) == (2, 2, 2)
    assert ((gate >= 0.0) & (gate <= 1.0)).all()
    reference = model.encode(state, source)  # [2, L, C]
    x_1 = jnp.broadcast_to(jax.random.normal(jax.random.key(3), reference.shape[1:]), reference.shape)
    _, variables = model._apply_dit(params, x_1, jnp.ones((2,)), model.encode_text(params, ids, mask), reference,
                                    mutable=["intermediates"])  # fmt: skip
    sown = np.asarray(variables["intermediates"]["text_cross_blocks_1"]["text_gate"][0])
    assert sown.shape == (2, 4 if text_cross_source else 8)  # [B, Lr] read from the source, or [B, L + Lr]
    np.testing.assert_allclose(gate.reshape(2, 4), sown[:, :4], rtol=1e-6)
    other_noise = np.asarray(gate_fn(params, state, ids, mask, source, 4))
    if text_cross_source:
        np.testing.assert_allclose(other_noise, gate, rtol=1e-6)
    else:
        assert np.abs(other_noise - gate).max() > 1e-6


def test_flow_grounding_reports_the_gate_per_role_and_no_changed_tokens(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")  # its sibling failure_breakdown, as when run as a script
    grounding = load_benchmark("mgt_grounding")
    editor = _tiny_flow_editor(32)
    assert grounding.has_text_gate(editor)
    report = grounding.flow_grounding(editor, "test", 24, batch_size=8)
    assert report and set(report) <= set(grounding.OBJECT_EDITS)
    for row in report.values():
        assert "referent_map" in row and not any(key.endswith("_changed") for key in row)
        assert all(0.0 <= row[key]["mean"] <= 1.0 for key in row)
    swap = grounding.name_swap(editor, "test", 24, batch_size=8)
    assert swap["pairs"] >= 1 and 0.0 <= swap["named_higher"] <= 1.0
    states = grounding.word_states(editor)
    assert states["color_word"] > 0.0 and states["kind_word"] > 0.0


def test_flops_by_module_counts_each_modules_products_and_convolutions():
    step_time = load_benchmark("train_step_time")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # [4, 6, 6, 3]
            x = nn.Conv(5, (3, 3), padding="VALID", name="conv")(x)  # [4, 4, 4, 5]
            return nn.Dense(7, name="head")(x.reshape(4, -1))  # [4, 7]

    net, x = Net(), jnp.ones((4, 6, 6, 3))
    params = net.init(jax.random.key(0), x)
    hlo_text = jax.jit(lambda p: net.apply(p, x)).lower(params).compile().as_text()
    flops = step_time.flops_by_module(hlo_text, 2)
    assert flops == {"Net/conv": 2 * (4 * 4 * 4 * 5) * (3 * 3 * 3), "Net/head": 2 * (4 * 7) * 80}
    assert step_time.flops_by_module(hlo_text, 1) == {"Net": flops["Net/conv"] + flops["Net/head"]}


def test_time_by_op_sums_each_compiled_ops_trace_events_per_step():
    step_time = load_benchmark("train_step_time")
    hlo_text = "\n".join([
        "ENTRY %main (p: f32[8]) -> f32[8] {",
        '  %exp_fusion = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/exp"}',
        '  ROOT %dot.3 = f32[8]{0} dot(%exp_fusion, %exp_fusion), metadata={op_name="jit(f)/Net/head/dot_general"}',
        "}",
    ])  # fmt: skip
    events = [
        {"ph": "X", "name": "exp_fusion", "dur": 300.0},
        {"ph": "X", "name": "dot.3", "dur": 1000.0},
        {"ph": "X", "name": "exp_fusion", "dur": 500.0},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000.0},  # a runtime event, not an op
        {"ph": "i", "name": "dot.3"},  # an instant event has no duration
    ]
    rows = step_time.time_by_op(events, hlo_text, steps=2, top=5)
    assert rows == [
        {"op": "dot.3", "ms": 0.5, "shape": "f32[8]", "op_name": "jit(f)/Net/head/dot_general"},
        {"op": "exp_fusion", "ms": 0.4, "shape": "f32[8]", "op_name": "jit(f)/exp"},
    ]
    assert [row["op"] for row in step_time.time_by_op(events, hlo_text, steps=2, top=1)] == ["dot.3"]


def test_held_out_role_tells_drawing_editing_and_keeping_a_held_out_composition():
    breakdown = load_benchmark("held_out_breakdown")
    from editing_jax.data.world import edits

    held = {("red", "triangle")}
    red_triangle = spec.SceneObject(cell="top-left", kind="triangle", color="red")
    red_square = spec.SceneObject(cell="top-left", kind="square", color="red")
    blue_circle = spec.SceneObject(cell="center", kind="circle", color="blue")

    def edit(source, target, edited_source, edited_target):
        scene = lambda objects: spec.Scene(background=spec.BACKGROUNDS[0], objects=tuple(objects))  # noqa: E731
        return edits.Edit("replace", scene(source), scene(target), "", "", "", edited_source, edited_target)

    # A replace that makes the red triangle draws it; one that turns it into a square edits it.
    assert breakdown.held_out_role(edit([red_square], [red_triangle], (red_square,), (red_triangle,)), held) == "draws"
    assert breakdown.held_out_role(edit([red_triangle], [red_square], (red_triangle,), (red_square,)), held) == "edits"
    # A style change keeps the composition on the edited object: edits, not draws.
    outlined = spec.SceneObject(cell="top-left", kind="triangle", color="red", style="outline")
    assert breakdown.held_out_role(edit([red_triangle], [outlined], (red_triangle,), (outlined,)), held) == "edits"
    # Held out only on an object the edit leaves alone: keeps; nowhere: none.
    moved = spec.SceneObject(cell="bottom-right", kind="circle", color="blue")
    assert breakdown.held_out_role(edit([red_triangle, blue_circle], [red_triangle, moved], (blue_circle,), (moved,)),
                                   held) == "keeps"  # fmt: skip
    assert breakdown.held_out_role(edit([blue_circle], [moved], (blue_circle,), (moved,)), held) == "none"


def test_held_out_breakdown_counts_roles_and_objects_and_reweights_to_another_mix():
    breakdown = load_benchmark("held_out_breakdown")
    from editing_jax.data.world import edits

    num = 24
    test_edits = [edits.generate_edit("test", 0, i) for i in range(num)]
    success = [i % 3 == 0 for i in range(num)]
    report = {"split": "test", "results": {"plain": {"per_example_success": success,
                                                     "per_example_edit_type": [e.edit_type for e in test_edits]}}}  # fmt: skip
    table = breakdown.breakdown(report, world_seed=0)
    assert sum(row["examples"] for row in table["objects"].values()) == num
    assert sum(row["success"] for row in table["objects"].values()) == sum(success)
    every = table["roles"]["all"]
    assert sum(row["examples"] for row in every.values()) == num
    assert "none" not in every  # every test example holds a held-out composition
    for n, row in table["objects"].items():
        assert row["examples"] == sum(len(e.source.objects) == n for e in test_edits)
    # Reweighting to its own mix gives the plain success; to another mix, the weighted mean of per-count rates.
    assert breakdown.reweighted_success(table["objects"], table["objects"]) == pytest.approx(sum(success) / num)
    objects = {1: {"examples": 10, "success": 8}, 2: {"examples": 10, "success": 4}}
    mix = {1: {"examples": 1, "success": 0}, 2: {"examples": 3, "success": 0}}
    assert breakdown.reweighted_success(objects, mix) == pytest.approx(0.25 * 0.8 + 0.75 * 0.4)
    with pytest.raises(ValueError, match="no examples with"):
        breakdown.reweighted_success({1: objects[1]}, mix)
    with pytest.raises(ValueError, match="wrong --world_seed"):
        wrong = {"split": "test", "results": {"plain": {"per_example_success": success,
                                                        "per_example_edit_type": ["identity"] * num}}}  # fmt: skip
        breakdown.breakdown(wrong, world_seed=0)
