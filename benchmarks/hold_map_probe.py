"""Where region hold can help: per edit type, how many tokens an edit must change and what the hold map says there.

  python benchmarks/hold_map_probe.py --checkpoint workdir/RUN --num 256 [--attention_source token_change
      --filter none] [--out benchmarks/results/hold_map_probe_RUN.json]

For each edit type of the held-out `test` split (the checkpoint's sampling settings, region hold at their lambda):
the share of tokens that differ between the source and target tokens ("must change"), the mean hold map on the
tokens that must change and on those that must not, the share of must-not-change tokens the edit changes anyway, and
the share of tokens held. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import numpy as np

from editing_jax.data.world.edits import SPLITS


def token_stats(target_changed: np.ndarray, hold_map: np.ndarray, output_changed: np.ndarray,
                held: np.ndarray) -> dict[str, float]:  # fmt: skip
    """Sums over one batch of examples of one edit type.

    Args:
      target_changed: `[N, h, w]` bool, target token != source token.
      hold_map: `[N, h, w]` the region-hold map in [0, 1].
      output_changed: `[N, h, w]` bool, output token != source token.
      held: `[N, h, w]` bool, tokens region hold reverted.

    Returns:
      Token counts and sums: 'tokens', 'must_change', 'map_on_change', 'map_on_keep', 'broken_keep', 'held'.
    """
    keep = ~target_changed
    return {
        "tokens": float(target_changed.size),
        "must_change": float(target_changed.sum()),
        "map_on_change": float(hold_map[target_changed].sum()),
        "map_on_keep": float(hold_map[keep].sum()),
        "broken_keep": float((output_changed & keep).sum()),
        "held": float(held.sum()),
    }


def oracle_hold(tokens: np.ndarray, source_tokens: np.ndarray, target_tokens: np.ndarray) -> np.ndarray:
    """`tokens` with every token the target keeps (target token == source token) reverted to the source token."""
    return np.where(target_tokens != source_tokens, tokens, source_tokens)


OUTCOMES = ("plain", "hold", "oracle_hold", "target_tokens")
OUTCOME_SUMS = ("examples", "successes", "l1_sum", "l1_examples")


def add_outcome(sums: dict[str, float], success: np.ndarray, preservation_l1: np.ndarray) -> None:
    """Adds one batch's `[N]` verifier successes and L1s (NaN where nothing lies outside the edit mask) to `sums`."""
    sums["examples"] += float(success.size)
    sums["successes"] += float(success.sum())
    sums["l1_sum"] += float(np.nansum(preservation_l1))
    sums["l1_examples"] += float(np.isfinite(preservation_l1).sum())


def outcome_mean(sums: dict[str, float]) -> dict[str, float]:
    """Success rate and mean L1 (over the examples with an L1, as `editing-jax eval`) from `add_outcome` sums."""
    return {
        "verifier_success": sums["successes"] / sums["examples"] if sums["examples"] else float("nan"),
        "preservation_l1": sums["l1_sum"] / sums["l1_examples"] if sums["l1_examples"] else float("nan"),
    }


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Shares and means from summed `token_stats` (NaN where a denominator is 0)."""
    must, keep = sums["must_change"], sums["tokens"] - sums["must_change"]

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "must_change_share": ratio(must, sums["tokens"]),
        "map_on_must_change": ratio(sums["map_on_change"], must),
        "map_on_must_keep": ratio(sums["map_on_keep"], keep),
        "must_keep_changed_share": ratio(sums["broken_keep"], keep),
        "held_share": ratio(sums["held"], sums["tokens"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--threshold", type=float, default=None, help="region hold's lambda (default: the checkpoint's)"
    )
    parser.add_argument("--attention_source", default=None, choices=("joint", "text_cross", "token_change"))
    parser.add_argument("--filter", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax

    from editing_jax import inference
    from editing_jax.methods import editmgt

    editor = inference.load_editor(args.checkpoint)
    model = editor.model
    settings = editor.settings(attention_source=args.attention_source, filter=args.filter,
                               region_hold_threshold=args.threshold)  # fmt: skip
    edit_fn = editor.edit_fn(settings)
    encode = jax.jit(model.encode_images)
    decode = jax.jit(functools.partial(editmgt.decode_edit, model, paste_source=settings.paste_source))
    per_type: dict[str, dict[str, float]] = {}
    outcomes: dict[str, dict[str, dict[str, float]]] = {}
    for index, raw in enumerate(inference.world_split_batches(editor, args.split, args.num)):
        batch = model.prepare_batch(raw)
        out = editmgt.run_edits(edit_fn, editor.params, editor.model_state, batch, settings, seed=index)
        plain = editmgt.run_edits(edit_fn, editor.params, editor.model_state, batch, settings, seed=index,
                                  region_hold_threshold=0.0)  # fmt: skip
        source = out["source_tokens"]  # [B, h, w]
        target = np.asarray(encode(editor.model_state, batch["target_image"]))  # [B, h, w]
        target_changed = target != source
        output_changed = out["tokens"] != source
        decoded = {
            name: {"images": np.asarray(decode(editor.model_state, tokens, source, batch["source_image"]))}
            for name, tokens in (
                ("oracle_hold", oracle_hold(plain["tokens"], source, target)),
                ("target_tokens", target),
            )
        }
        scores = {
            name: editmgt.score_edits(o, batch) for name, o in (("plain", plain), ("hold", out), *decoded.items())
        }
        types = np.asarray([str(t) for t in batch["edit_type"]])
        for edit_type in sorted(set(types.tolist())):
            rows = types == edit_type
            stats = token_stats(target_changed[rows], out["attention"][rows], output_changed[rows], out["held"][rows])
            totals = per_type.setdefault(edit_type, dict.fromkeys(stats, 0.0))
            for key, value in stats.items():
                totals[key] += value
            sums = outcomes.setdefault(edit_type, {name: dict.fromkeys(OUTCOME_SUMS, 0.0) for name in OUTCOMES})
            for name in OUTCOMES:
                add_outcome(sums[name], scores[name]["success"][rows], scores[name]["preservation_l1"][rows])
    overall = {name: {key: sum(outcomes[t][name][key] for t in outcomes) for key in OUTCOME_SUMS} for name in OUTCOMES}
    outcome_means = {
        edit_type: {name: outcome_mean(v) for name, v in sums.items()}
        for edit_type, sums in {**outcomes, "all": overall}.items()
    }
    report = {
        "command": " ".join(
            [
                "python benchmarks/hold_map_probe.py",
                f"--checkpoint {args.checkpoint}",
                f"--num {args.num}",
                f"--split {args.split}",
            ]
            + [
                f"--{k} {getattr(args, k)}"
                for k in ("threshold", "attention_source", "filter")
                if getattr(args, k) is not None
            ]
        ),
        "attention_source": settings.attention_source,
        "region_hold_threshold": settings.region_hold_threshold,
        "per_edit_type": {edit_type: summarize(sums) for edit_type, sums in per_type.items()},
        "outcomes": outcome_means,
    }
    out_path = pathlib.Path(args.out or f"benchmarks/results/hold_map_probe_{pathlib.Path(args.checkpoint).name}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print("| edit type | must change | map on must-change | map on must-keep | must-keep changed | held |")
    print("|---|---|---|---|---|---|")
    for edit_type, v in report["per_edit_type"].items():
        print(f"| {edit_type} | {v['must_change_share']:.0%} | {v['map_on_must_change']:.2f} | "
              f"{v['map_on_must_keep']:.2f} | {v['must_keep_changed_share']:.0%} | {v['held_share']:.0%} |")  # fmt: skip
    print()
    print(
        "| edit type | success: " + " / ".join(OUTCOMES) + " | L1 outside the edit mask: " + " / ".join(OUTCOMES) + " |"
    )
    print("|---|---|---|")
    for edit_type, v in outcome_means.items():
        success = " / ".join(f"{v[name]['verifier_success']:.1%}" for name in OUTCOMES)
        l1 = " / ".join(f"{v[name]['preservation_l1']:.5f}" for name in OUTCOMES)
        print(f"| {edit_type} | {success} | {l1} |")


if __name__ == "__main__":
    main()
