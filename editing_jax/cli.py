"""The `editing-jax` command line. Thin: parses flags and calls library functions.

Subcommands:
  data generate   prepare a world dataset (tfds, array_record) plus a preview grid
  data check      print the verifier self-check figures as one JSON line
  train           train a method from a config, resuming from the workdir
  verify          score an image against a target scene graph, as one JSON line
  edit            edit one image with a trained editor (EditMGT or the flow editor)
  eval            verifier success per edit type and preservation L1 on a world split
  quickstart      world -> VQ -> EditMGT -> held-out evaluation, figures and metrics in one run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np

from editing_jax import __version__, config_lib
from editing_jax.data.world.edits import SPLITS

DEFAULT_WORLD_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "world" / "default.py")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from editing_jax import compare, inference
    from editing_jax.data import image_io, manifest
    from editing_jax.train import checkpoint

    return (
        UserError,
        config_lib.ConfigError,
        image_io.ImageError,
        manifest.ManifestError,
        checkpoint.CheckpointError,
        inference.EditorError,
        compare.CompareError,
    )


def _aborted_type() -> type[BaseException]:
    from editing_jax.train import trainer

    return trainer.TrainingAborted


def _world_config(args: argparse.Namespace):
    from editing_jax.data.world import edits

    if args.config or pathlib.Path(DEFAULT_WORLD_CONFIG).exists():
        config = config_lib.load_config(args.config or DEFAULT_WORLD_CONFIG, args.config_overrides)
    else:  # Installed without the repository's configs/: the same defaults, built in.
        config = ml_collections.ConfigDict({"size": edits.WorldConfig().size, "seed": 0})
        config.lock()
        config_lib.apply_overrides(config, args.config_overrides)
    with config.unlocked():
        for key in ("size", "seed"):
            if getattr(args, key, None) is not None:
                config[key] = getattr(args, key)
    try:
        return config, edits.WorldConfig.from_config(config)
    except ValueError as error:
        raise UserError(f"invalid world config: {error}") from error


def _cmd_data_generate(args: argparse.Namespace) -> None:
    from editing_jax.data import tfds_world
    from editing_jax.data.world import edits

    config, world = _world_config(args)
    if args.num <= 0:
        raise UserError(f"--num must be positive, got {args.num}")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints banners; stdout is for the JSON result only.
        dataset_dir = tfds_world.prepare_world_dataset(
            out, split_sizes={args.split: args.num}, size=world.size, seed=config.seed, show_progress=not args.quiet
        )
    preview_path = out / f"preview_{args.split}.png"
    samples = [edits.generate_sample(args.split, config.seed, i, world) for i in range(min(args.preview, args.num))]
    _write_preview(samples, preview_path)
    print(
        json.dumps(
            {
                "dataset_dir": str(dataset_dir),
                "split": args.split,
                "num": args.num,
                "size": world.size,
                "seed": config.seed,
                "preview": str(preview_path),
            }
        )
    )


def _write_preview(samples, path: pathlib.Path) -> None:
    from editing_jax import viz
    from editing_jax.data import image_io

    rows = [[s.source_image, s.target_image, s.edit_mask, s.object_mask] for s in samples]
    labels = [f"[{s.edit.edit_type}] {s.instruction}" for s in samples]
    grid = viz.image_grid(
        rows, row_labels=labels, column_labels=["source", "target", "edit mask", "object mask"], cell_size=96
    )
    image_io.write_image_atomic(path, grid)


def _cmd_data_check(args: argparse.Namespace) -> None:
    from editing_jax.data.world import check

    if args.num <= 0:
        raise UserError(f"--num must be positive, got {args.num}")
    report = check.check_world(num=args.num, size=args.size, seed=args.seed, split=args.split, progress=not args.quiet)
    print(json.dumps(report, sort_keys=True))


def _read_scene(text: str):
    from editing_jax.data.world import spec

    path = pathlib.Path(text)
    source = text
    if not text.lstrip().startswith("{"):
        if not path.is_file():
            raise UserError(f"--target_scene: {text} is neither JSON nor an existing file")
        source = path.read_text()
    try:
        return spec.Scene.from_json(source)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"--target_scene: not a valid scene graph ({error})") from error


def _cmd_verify(args: argparse.Namespace) -> None:
    from editing_jax.data import image_io
    from editing_jax.data.world import verifier

    target = _read_scene(args.target_scene)
    image = image_io.read_image(args.image)
    if image.shape[0] != image.shape[1]:
        raise UserError(f"{args.image}: the verifier needs a square image, got {image.shape[1]}x{image.shape[0]}")
    sources = edit_masks = None
    if args.source:
        source = image_io.read_image(args.source)
        if source.shape != image.shape:
            raise UserError(f"--source {args.source} is {source.shape[:2]}, --image is {image.shape[:2]}")
        sources = [source]
        if args.edit_mask:
            edit_masks = [image_io.read_image(args.edit_mask).mean(axis=-1) > 127]
    result = verifier.verify([image], [target], sources, edit_masks)
    report = {
        "success": bool(result.success[0]),
        "attribute_accuracy": float(result.attribute_accuracy[0]),
        "coherent": bool(result.coherent[0]),
        "coherence": float(result.coherence[0]),
        "preservation_l1": None if np.isnan(result.preservation_l1[0]) else float(result.preservation_l1[0]),
        "failed_attributes": sorted(k for k, v in result.attributes[0].items() if not v),
        "parsed_scene": result.parsed[0].to_dict(),
    }
    print(json.dumps(report, sort_keys=True))


def _cmd_train(args: argparse.Namespace) -> None:
    import jax

    from editing_jax.train import trainer

    if args.distributed:
        jax.distributed.initialize()
    config = config_lib.load_config(args.config, args.config_overrides)
    try:
        run = trainer.build_trainer(
            config, args.workdir, restore=args.restore, progress=not args.quiet, with_eval=not args.compile_only
        )
    except ValueError as error:
        raise UserError(f"invalid config {args.config}: {error}") from error
    summary = run.run(compile_only=args.compile_only)
    if jax.process_index() == 0:
        print(json.dumps(summary, sort_keys=True))


def _sampling_overrides(args: argparse.Namespace) -> dict:
    return {
        "num_steps": args.steps,
        "guidance_scale": args.guidance,
        "start_time": args.start_time,
        "gamma": args.gamma,
        "region_hold_threshold": args.region_hold_threshold,
        "filter": args.filter,
        "token_temperature": args.token_temperature,
        "temperature": args.remask_noise,
        "map_scaling": args.map_scaling,
        "attention_source": args.attention_source,
        "paste_source": args.paste_source,
        "text_positions": "keyword" if getattr(args, "query", None) else None,
    }


def _settings(editor, args: argparse.Namespace):
    try:
        return editor.settings(**_sampling_overrides(args))
    except ValueError as error:
        raise UserError(str(error)) from error


def _cmd_edit(args: argparse.Namespace) -> None:
    from editing_jax import inference
    from editing_jax.data import image_io

    if not args.instruction.strip():
        raise UserError("--instruction is empty")
    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise UserError(f"--out {out}: use an image extension (.png, .jpg, ...)")
    editor = inference.load_editor(args.checkpoint)
    if args.save_attention and editor.is_flow:
        raise UserError("--save_attention needs an EditMGT checkpoint (the flow editor has no attention maps)")
    image = inference.load_image_for(editor, args.image)
    settings = _settings(editor, args)
    batch = editor.prepare(image[None], [args.instruction], query=args.query)
    outputs = editor.run(batch, settings, seed=args.seed)
    image_io.write_image_atomic(out, outputs["images"][0])
    report = {"out": str(out), "size": editor.image_size, "steps": settings.num_steps}
    if "held" in outputs:  # EditMGT's region hold
        report["held_fraction"] = float(np.mean(outputs["held"][0]))
    if args.save_attention:
        attention = np.round(np.clip(outputs["attention"][0], 0.0, 1.0) * 255.0).astype(np.uint8)
        attention = np.repeat(np.repeat(attention, editor.image_size // attention.shape[0], 0), editor.image_size
                              // attention.shape[1], 1)  # fmt: skip
        image_io.write_image_atomic(args.save_attention, np.repeat(attention[..., None], 3, axis=-1))
        report["attention"] = str(args.save_attention)
    print(json.dumps(report, sort_keys=True))


def _cmd_eval(args: argparse.Namespace) -> None:
    from editing_jax import inference

    editor = inference.load_editor(args.checkpoint)
    settings = _settings(editor, args)
    report = inference.evaluate_split(
        editor,
        split=args.split,
        num_examples=args.num,
        batch_size=args.batch_size,
        settings=settings,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    summary = {name: {"verifier_success": r["verifier_success"], "preservation_l1": r["preservation_l1"]}
               for name, r in report["results"].items()}  # fmt: skip
    print(json.dumps({"out": args.out, "results": summary}, sort_keys=True))


def _cmd_compare(args: argparse.Namespace) -> None:
    from editing_jax import compare

    a = compare.load_pooled(args.a, args.setting)
    b = compare.load_pooled(args.b, args.setting_b or args.setting)
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    result = compare.compare(a, b, types)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"A = {args.a}, B = {args.b}")
        print(compare.format_table(result, "A", "B"))


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from editing_jax import quickstart

    if args.editmgt_steps is not None and args.editmgt_steps <= 0:
        raise UserError(f"--editmgt_steps must be positive, got {args.editmgt_steps}")
    if args.minutes is not None and args.minutes <= 0:
        raise UserError(f"--minutes must be positive, got {args.minutes}")
    if args.minutes is not None and args.editmgt_steps is not None:
        raise UserError("give --minutes or --editmgt_steps, not both")
    overrides = [] if args.editmgt_steps is None else [f"--config.train.num_steps={args.editmgt_steps}"]
    try:
        report = quickstart.run(args.workdir, show_progress=not args.quiet, num_eval=args.num_eval,
                                editmgt_overrides=overrides, minutes=args.minutes)  # fmt: skip
    except quickstart.BudgetError as error:
        raise UserError(str(error)) from error
    print(json.dumps(report["summary"], sort_keys=True))


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default: from the checkpoint)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (0 = off)")
    parser.add_argument("--gamma", type=float, default=None, help="condition strength gamma (1 = plain attention)")
    parser.add_argument(
        "--start_time",
        type=float,
        default=None,
        help="flow editor: start the ODE at t in (0, 1] from the noised source (img2img; default 1, pure noise)",
    )
    parser.add_argument("--region_hold_threshold", type=float, default=None, help="lambda; 0 disables region hold")
    parser.add_argument(
        "--filter", default=None, help="attention smoothing: none/gaussian/bilateral/morphological/adaptive"
    )
    parser.add_argument(
        "--token_temperature", type=float, default=None, help="EditMGT token sampling temperature (0 = argmax)"
    )
    parser.add_argument(
        "--remask_noise", type=float, default=None, help="EditMGT initial Gumbel noise of the re-masking confidences"
    )
    parser.add_argument(
        "--map_scaling", default=None, help="EditMGT attention map scaling for region hold: minmax (paper), max, none"
    )
    parser.add_argument(
        "--attention_source",
        default=None,
        help="EditMGT region-hold map: joint (the paper's joint attention), text_cross (text cross-attention) or "
        "token_change (the token change head of models trained with it)",
    )
    parser.add_argument(
        "--paste_source",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EditMGT: keep the input's pixels where the output token is the source token (default: from the "
        "checkpoint, on for edit models)",
    )
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editing-jax", description="Instruction-based image editing research.")
    parser.add_argument("--version", action="version", version=f"editing-jax {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="the synthetic editing world").add_subparsers(dest="data_command")
    data.required = True
    generate = data.add_parser("generate", help="prepare a dataset (tfds array_record) and a preview grid")
    generate.add_argument("--out", required=True, help="output data directory")
    generate.add_argument("--split", default="train", choices=SPLITS)
    generate.add_argument("--num", type=int, default=256, help="number of examples")
    generate.add_argument("--size", type=int, default=None, help="canvas size in pixels (default: from config)")
    generate.add_argument("--seed", type=int, default=None, help="world seed (default: from config)")
    generate.add_argument("--config", default=None, help="world config (default configs/world/default.py)")
    generate.add_argument("--preview", type=int, default=8, help="rows in the preview grid")
    generate.set_defaults(handler=_cmd_data_generate)

    check = data.add_parser("check", help="verifier self-check figures as one JSON line")
    check.add_argument("--num", type=int, default=2000)
    check.add_argument("--size", type=int, default=64)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--split", default="train", choices=SPLITS)
    check.set_defaults(handler=_cmd_data_check)

    train = commands.add_parser("train", help="train a method from a config (resumes from WORKDIR)")
    train.add_argument("--config", required=True, help="config file, optionally with :variant")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics, samples and summary go here")
    train.add_argument("--restore", default=None, help="checkpoint dir or step dir to start from (must exist)")
    train.add_argument("--compile_only", action="store_true", help="print per-device memory/FLOPs, do not train")
    train.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (pods)")
    train.set_defaults(handler=_cmd_train)

    verify = commands.add_parser("verify", help="score an image against a target scene graph")
    verify.add_argument("--image", required=True, help="image to score (square)")
    verify.add_argument("--target_scene", required=True, help="target scene graph: JSON text or a .json file")
    verify.add_argument("--source", default=None, help="source image, for preservation L1")
    verify.add_argument("--edit_mask", default=None, help="edit mask image (white = edited), with --source")
    verify.set_defaults(handler=_cmd_verify)

    edit = commands.add_parser("edit", help="edit one image with a trained editor checkpoint")
    edit.add_argument(
        "--checkpoint", required=True, help="EditMGT or flow_edit run directory (or checkpoints/step dir)"
    )
    edit.add_argument("--image", required=True, help="input image (center-cropped and resized to the model size)")
    edit.add_argument("--instruction", required=True, help="edit instruction")
    edit.add_argument("--out", required=True, help="output image path (written atomically)")
    edit.add_argument("--query", default=None, help="phrase of the instruction whose attention drives region hold")
    edit.add_argument("--save_attention", default=None, help="also write the consolidated attention map here")
    _add_sampling_flags(edit)
    edit.set_defaults(handler=_cmd_edit)

    evaluate = commands.add_parser("eval", help="verifier success per edit type on a world split")
    evaluate.add_argument("--checkpoint", required=True, help="EditMGT or flow_edit run directory")
    evaluate.add_argument("--split", default="test", choices=SPLITS)
    evaluate.add_argument("--num", type=int, default=256, help="number of examples")
    evaluate.add_argument("--batch_size", type=int, default=64)
    evaluate.add_argument("--out", default=None, help="write the full results JSON here")
    _add_sampling_flags(evaluate)
    evaluate.set_defaults(handler=_cmd_eval)

    comp = commands.add_parser(
        "compare", help="paired exact test of two evaluations on the same examples (eval reports, FILE#ROW rows)"
    )
    comp.add_argument(
        "a",
        help="`editing-jax eval --out` JSON, or a benchmarks/cogniedit_eval.py JSON as FILE#ROW; comma-separated "
        "seeds pool (paired in order with B's)",
    )
    comp.add_argument("b", help="the same for the other editor")
    comp.add_argument("--setting", default="plain", help="eval report setting: plain or hold (default plain)")
    comp.add_argument("--setting_b", default=None, help="B's setting when it differs (e.g. plain vs hold)")
    comp.add_argument(
        "--types",
        default="",
        help="comma-separated edit types to pool into one more row and test, e.g. color,replace,remove,add",
    )
    comp.add_argument("--json", action="store_true", help="print the full result as JSON instead of a table")
    comp.set_defaults(handler=_cmd_compare)

    quick = commands.add_parser("quickstart", help="world -> VQ -> EditMGT -> held-out eval, on CPU in minutes")
    quick.add_argument("--workdir", required=True, help="everything goes here; an interrupted run resumes")
    quick.add_argument("--num_eval", type=int, default=256, help="held-out examples to evaluate")
    quick.add_argument(
        "--editmgt_steps",
        type=int,
        default=None,
        help="EditMGT training steps (default: train.num_steps of configs/editmgt/edit.py:size=32,quick, sized to the "
        "15-minute budget on the development CPU)",
    )
    quick.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-time budget for the whole run: EditMGT's steps are sized to this machine by timing a few first "
        "(the step count goes into quickstart.json; a resumed run keeps it)",
    )
    quick.set_defaults(handler=_cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        argv, overrides = config_lib.split_config_overrides(argv)
    except config_lib.ConfigError as error:
        print(f"editing-jax: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.config_overrides = overrides
    if overrides and not hasattr(args, "config"):
        print("editing-jax: error: --config.* overrides need a command that takes --config", file=sys.stderr)
        return 2
    try:
        args.handler(args)
    except _user_error_types() as error:
        print(f"editing-jax: error: {error}", file=sys.stderr)
        return 2
    except _aborted_type() as error:
        print(f"editing-jax: training aborted: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("editing-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
