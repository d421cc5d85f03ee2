"""Paired comparison of evaluations: the exact test and the report readers."""

import json
import math

import numpy as np
import pytest

from editing_jax import compare


@pytest.mark.parametrize(
    "only_a, only_b, expected",
    [(0, 0, 1.0), (0, 6, 2 / 64), (6, 0, 2 / 64), (3, 3, 1.0), (1, 9, 2 * 11 / 1024), (5, 15, 2 * 21700 / 2**20)],
)
def test_sign_test_matches_the_binomial_tail(only_a, only_b, expected):
    assert compare.sign_test_p_value(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_sign_test_matches_a_float64_binomial_sum():
    for only_a in range(0, 30, 7):
        for only_b in range(0, 30, 5):
            n, k = only_a + only_b, min(only_a, only_b)
            tail = sum(math.comb(n, i) * 0.5**n for i in range(k + 1)) if n else 0.5
            assert compare.sign_test_p_value(only_a, only_b) == pytest.approx(min(1.0, 2 * tail))


def test_compare_counts_discordant_examples_per_type():
    types = np.asarray(["color", "color", "add", "add", "add"])
    a = {"success": np.asarray([1, 0, 1, 1, 0], bool), "edit_type": types}
    b = {"success": np.asarray([0, 0, 1, 0, 1], bool), "edit_type": types}
    result = compare.compare(a, b)
    assert (result["success_a"], result["success_b"], result["only_a"], result["only_b"]) == (3, 2, 2, 1)
    assert result["per_edit_type"]["color"] == {"num_examples": 2, "success_a": 1, "success_b": 0, "only_a": 1,
                                                "only_b": 0, "p_value": 1.0}  # fmt: skip
    assert result["per_edit_type"]["add"]["only_b"] == 1
    table = compare.format_table(result, "A", "B")
    assert "| **all** | 5 | 3 (60.0 %) | 2 (40.0 %) | 2 | 1 | 1 |" in table


def test_compare_refuses_different_examples():
    a = {"success": np.ones(3, bool), "edit_type": np.asarray(["add", "color", "add"])}
    b = {"success": np.ones(3, bool), "edit_type": np.asarray(["add", "add", "color"])}
    with pytest.raises(compare.CompareError, match="same examples"):
        compare.compare(a, b)


def test_load_outcomes_reads_eval_reports_and_benchmark_rows(tmp_path):
    record = {"per_example_success": [1, 0], "per_example_edit_type": ["add", "color"]}
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"results": {"plain": record, "hold": {**record, "per_example_success": [0, 0]}}}))
    assert compare.load_outcomes(str(report))["success"].tolist() == [True, False]
    assert compare.load_outcomes(str(report), "hold")["success"].tolist() == [False, False]
    with pytest.raises(compare.CompareError, match="not 'nope'"):
        compare.load_outcomes(str(report), "nope")
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"rows": [{"verifier_success": 0.5}, record]}))
    assert compare.load_outcomes(f"{rows}#1")["edit_type"].tolist() == ["add", "color"]
    with pytest.raises(compare.CompareError, match="no per-example outcomes"):
        compare.load_outcomes(str(rows))
    with pytest.raises(compare.CompareError, match="must be a number"):
        compare.load_outcomes(f"{rows}#first")
    with pytest.raises(compare.CompareError, match="asked for row 5"):
        compare.load_outcomes(f"{rows}#5")
    with pytest.raises(compare.CompareError, match="cannot read"):
        compare.load_outcomes(str(tmp_path / "missing.json"))


def test_pooled_seeds_concatenate_in_order_and_sum_the_discordant_counts(tmp_path):
    def write(name, success):
        path = tmp_path / name
        path.write_text(json.dumps({"results": {"plain": {"per_example_success": success,
                                                          "per_example_edit_type": ["add", "color"]}}}))  # fmt: skip
        return str(path)

    a = compare.load_pooled(f"{write('a0', [1, 0])},{write('a1', [1, 1])}")
    b = compare.load_pooled(f"{write('b0', [0, 0])},{write('b1', [0, 1])}")
    assert a["success"].tolist() == [True, False, True, True]
    assert a["edit_type"].tolist() == ["add", "color", "add", "color"]
    result = compare.compare(a, b)
    assert (result["only_a"], result["only_b"]) == (2, 0)
    assert result["per_edit_type"]["add"]["only_a"] == 2
    with pytest.raises(compare.CompareError, match="no evaluation"):
        compare.load_pooled(",")


def test_selected_types_pool_their_examples_into_one_test():
    types = np.asarray(["color", "add", "add", "move", "move"])
    a = {"success": np.asarray([1, 1, 1, 0, 1], bool), "edit_type": types}
    b = {"success": np.asarray([0, 0, 1, 1, 1], bool), "edit_type": types}
    result = compare.compare(a, b, types=("color", "add"))
    selected = result["selected_types"]
    assert selected["types"] == ["color", "add"]
    assert (selected["num_examples"], selected["success_a"], selected["success_b"]) == (3, 3, 1)
    assert (selected["only_a"], selected["only_b"]) == (2, 0)
    assert selected["p_value"] == pytest.approx(compare.sign_test_p_value(2, 0))
    assert "| **color + add** | 3 | 3 (100.0 %) | 1 (33.3 %) | 2 | 0 |" in compare.format_table(result, "A", "B")
    assert "selected_types" not in compare.compare(a, b)
    with pytest.raises(compare.CompareError, match=r"\['resize'\] are not in the evaluations"):
        compare.compare(a, b, types=("add", "resize"))
