"""Paired comparison of two evaluations on the same held-out examples.

Two editors evaluated on the same world split succeed or fail on the same examples, so their difference is judged
on the examples where exactly one of them succeeds (McNemar's exact test: under "no difference" each such example
is a fair coin). On 256 examples a 2-point gap is 5 examples, well inside the noise unless nearly all discordant
examples go one way; the test says which.

An outcome record is `{'success': bool [N], 'edit_type': str [N]}` read from an `editing-jax eval` report
(`results.<setting>.per_example_success` / `per_example_edit_type`) or from a row of
`benchmarks/cogniedit_eval.py` (`FILE#ROW`, default row 0). Several seeds of each editor (`A1,A2 B1,B2`, paired in
order) pool their examples: each seed's pair is a stratum of the same test, and under "no difference" every
discordant example of every stratum is still a fair coin.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np


class CompareError(ValueError):
    """Reports that cannot be compared (missing per-example outcomes, different examples)."""


def sign_test_p_value(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar (sign) test p-value of `only_a` vs `only_b` discordant examples."""
    if only_a < 0 or only_b < 0:
        raise ValueError("counts must be >= 0")
    total = only_a + only_b
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2.0 * tail / 2.0**total)


def load_outcomes(spec: str, setting: str = "plain") -> dict[str, np.ndarray]:
    """Per-example outcomes of an eval report (`setting`: 'plain' / 'hold') or of a `FILE#ROW` benchmark row."""
    path, _, row = spec.partition("#")
    try:
        report = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CompareError(f"cannot read {path}: {error}") from error
    if "rows" in report:
        rows = report["rows"]
        if row and not row.isdigit():
            raise CompareError(f"{spec}: the row after '#' must be a number")
        index = int(row or 0)
        if index >= len(rows):
            raise CompareError(f"{path} has {len(rows)} rows, asked for row {index}")
        record = rows[index]
    elif "results" in report:
        if setting not in report["results"]:
            raise CompareError(f"{path} has settings {sorted(report['results'])}, not {setting!r}")
        record = report["results"][setting]
    else:
        raise CompareError(f"{path} is neither an `editing-jax eval` report nor a cogniedit_eval file")
    if "per_example_success" not in record:
        raise CompareError(f"{spec} has no per-example outcomes; re-run the evaluation with this version")
    success = np.asarray(record["per_example_success"], bool)
    edit_type = np.asarray(record["per_example_edit_type"], str)
    if success.shape != edit_type.shape:
        raise CompareError(f"{spec}: {success.size} outcomes but {edit_type.size} edit types")
    return {"success": success, "edit_type": edit_type}


def load_pooled(specs: str, setting: str = "plain") -> dict[str, np.ndarray]:
    """`load_outcomes` of each comma-separated spec, concatenated in order."""
    records = [load_outcomes(spec, setting) for spec in specs.split(",") if spec]
    if not records:
        raise CompareError("no evaluation given")
    return {key: np.concatenate([r[key] for r in records]) for key in ("success", "edit_type")}


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], types: tuple[str, ...] = ()) -> dict[str, Any]:
    """Success of A and B, their discordant counts and the exact test, overall and per edit type.

    `types`, when given, adds `selected_types`: the same counts pooled over those edit types (e.g. the four types of
    a per-type target), one test over their examples together.
    """
    if a["success"].shape != b["success"].shape or not np.array_equal(a["edit_type"], b["edit_type"]):
        raise CompareError("the two evaluations are not on the same examples (split, number or order differ)")
    types = tuple(dict.fromkeys(types))  # a type named twice is pooled once
    present = set(a["edit_type"].tolist())
    unknown = sorted(set(types) - present)
    if unknown:
        raise CompareError(f"edit types {unknown} are not in the evaluations; they have {sorted(present)}")

    def counts(mask: np.ndarray) -> dict[str, Any]:
        sa, sb = a["success"][mask], b["success"][mask]
        only_a, only_b = int(np.sum(sa & ~sb)), int(np.sum(~sa & sb))
        return {
            "num_examples": int(mask.sum()),
            "success_a": int(sa.sum()),
            "success_b": int(sb.sum()),
            "only_a": only_a,
            "only_b": only_b,
            "p_value": sign_test_p_value(only_a, only_b),
        }

    everything = np.ones(a["success"].shape, bool)
    per_type = {t: counts(a["edit_type"] == t) for t in sorted(present)}
    result = {**counts(everything), "per_edit_type": per_type}
    if types:
        result["selected_types"] = {"types": list(types), **counts(np.isin(a["edit_type"], types))}
    return result


def format_table(result: dict[str, Any], name_a: str, name_b: str) -> str:
    """A markdown table of `compare`'s result: overall first, the selected types pooled if any, then each type."""
    lines = [
        f"| edit type | n | {name_a} | {name_b} | only A | only B | exact p |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(label: str, c: dict[str, Any]) -> str:
        n = c["num_examples"]
        return (f"| {label} | {n} | {c['success_a']} ({100 * c['success_a'] / n:.1f} %) | "
                f"{c['success_b']} ({100 * c['success_b'] / n:.1f} %) | {c['only_a']} | {c['only_b']} | "
                f"{c['p_value']:.3g} |")  # fmt: skip

    lines.append(row("**all**", result))
    if "selected_types" in result:
        lines.append(row(f"**{' + '.join(result['selected_types']['types'])}**", result["selected_types"]))
    lines.extend(row(t, c) for t, c in result["per_edit_type"].items())
    return "\n".join(lines)
