"""Seconds per compiled train step, and its compile time, for several override sets of one config, side by side.

    python benchmarks/train_step_time.py --config configs/editmgt/edit.py:size=32,quick \
        --base "--config.tokenizer.checkpoint=workdir/vqp --config.data.num_eval_examples=0" \
        --variant "" --variant "--config.model.source_copy=False" [--steps 20]

Each variant builds its trainer, compiles the step ahead of time, runs one warm-up step and then `--steps` steps on
one fixed batch (no data loading, logging or checkpoints: the loop's own overhead is not included). One JSON line per
variant. XLA flags act per process: run the script once per `XLA_FLAGS` value to compare them.

`--by_module DEPTH` adds `gflop_by_module`: the FLOPs of the compiled step's matrix products and convolutions
(forward and backward together), summed by the first DEPTH names of the module path in each op's metadata, largest
first. Elementwise ops are not counted, so the sum is a little below `gflop_per_step`, and a product inside a loop
body (a `lax.scan`, e.g. a sampler's steps) is counted once, not once per iteration.

`--profile TOP` adds `ms_by_op`: the TOP compiled ops (fusions, products) that took the most time per step, from a
`jax.profiler` trace of `--steps` more steps, each with its output shape and the op it came from (`op_name`
metadata). On CPU this is where the time goes when the FLOPs do not say (transposes, reductions, softmax).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import shlex
import tempfile
import time

import jax

from editing_jax import config_lib
from editing_jax.train import checkpoint, sharding, trainer

_SHAPE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PRODUCT = re.compile(r"= \w+\[([\d,]*)\]\{[^}]*\} (dot|convolution)\(%([\w.\-]+), %([\w.\-]+)\)(.*)")


def _op_name(text: str, default: str) -> str:
    """The `op_name` metadata of an HLO instruction's text, or `default`."""
    match = _OP_NAME.search(text)
    return match.group(1) if match else default


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def flops_by_module(hlo_text: str, depth: int) -> dict[str, float]:
    """FLOPs of every dot and convolution in optimized HLO text, summed by module path (its first `depth` names).

    A dot's FLOPs are 2 x output elements x contracted size; a convolution's 2 x output elements x the kernel's
    elements per output feature. The path is the op's `op_name` metadata with the jit / jvp / transpose wrappers
    removed, so a module's forward and backward products land under one name. Loop bodies count once.
    """
    shapes = {name: _dims(dims) for name, dims in _SHAPE.findall(hlo_text)}
    totals = collections.Counter()
    for line in hlo_text.splitlines():
        match = _PRODUCT.search(line)
        if not match:
            continue
        out_dims, kind, lhs, rhs, rest = match.groups()
        out = math.prod(_dims(out_dims))
        if kind == "dot":
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            size = math.prod(shapes[lhs][i] for i in _dims(contracting.group(1))) if contracting else 1
        else:
            kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
            kernel = shapes[rhs]
            size = math.prod(kernel) // kernel[kernel_labels.index("o")]
        path = re.sub(r"\b(jit|jvp|transpose|checkpoint|remat)\(|\)", "", _op_name(rest, "?"))
        names = [n for n in path.split("/") if n][1:]  # drop the jitted function's name
        totals["/".join(names[:depth]) or "?"] += 2.0 * out * size
    return dict(totals.most_common())


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+\[[\d,]*\])")


def time_by_op(trace_events: list[dict], hlo_text: str, steps: int, top: int) -> list[dict]:
    """Milliseconds per step of the compiled ops in a trace, largest first (the `top` of them).

    `trace_events` are Chrome / Perfetto trace events; the complete ('X') events named after an instruction of the
    entry computation of `hlo_text` are summed by name (runtime events such as the executor's are left out) and
    divided by `steps`. Each row carries the instruction's output shape and its `op_name` metadata.
    """
    instructions = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            instructions[match.group(1)] = (match.group(2), _op_name(line, ""))
    totals = collections.Counter()
    for event in trace_events:
        if event.get("ph") == "X" and event.get("name") in instructions:
            totals[event["name"]] += float(event.get("dur", 0.0))  # microseconds
    rows = []
    for name, micros in totals.most_common(top):
        shape, op_name = instructions[name]
        rows.append({"op": name, "ms": round(micros / steps / 1e3, 3), "shape": shape, "op_name": op_name})
    return rows


def _profile(compiled, state, batch, rng, steps: int) -> list[dict]:
    """Trace events of `steps` more steps (the state is advanced, not returned: timings only)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            state, metrics = compiled.executable(state, batch, rng)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as file:
            trace = json.load(file)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def measure(config_spec: str, overrides: list[str], steps: int, by_module: int = 0, profile: int = 0) -> dict:
    config = config_lib.load_config(config_spec, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        run = trainer.build_trainer(config, workdir, progress=False, with_eval=False)
        example = sharding.device_batch(run._host_example_batch(), run.mesh)
        state, shardings = run.init_state(example)
        abstract_state = checkpoint.abstract_with_shardings(state, shardings)
        abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), example)
        compiled = run.compile(shardings, abstract_state, abstract_batch)
        state, metrics = compiled.executable(state, example, run.train_rng)  # warm-up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled.executable(state, example, run.train_rng)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
        hlo_text = compiled.executable.as_text() if by_module or profile else ""
        events = _profile(compiled, state, example, run.train_rng, steps) if profile else []
    result = {
        "overrides": overrides,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seconds_per_step": round(seconds, 4),
        "gflop_per_step": round((compiled.flops or 0.0) / 1e9, 2),
        "compile_seconds": round(compiled.compile_seconds, 1),
    }
    if by_module:
        modules = flops_by_module(hlo_text, by_module)
        result["gflop_by_module"] = {name: round(flops / 1e9, 3) for name, flops in modules.items()}
    if profile:
        result["ms_by_op"] = time_by_op(events, hlo_text, steps, profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config spec, e.g. configs/editmgt/edit.py:size=32,quick")
    parser.add_argument("--base", default="", help="overrides shared by every variant (one shell-quoted string)")
    parser.add_argument("--variant", action="append", default=None, help="extra overrides of one variant")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--by_module", type=int, default=0, metavar="DEPTH",
                        help="also report the step's matmul/conv FLOPs by module path (its first DEPTH names)")  # fmt: skip
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also trace --steps more steps and report the TOP ops by time per step")  # fmt: skip
    args = parser.parse_args()
    if args.steps <= 0:
        parser.error("--steps must be positive")
    if args.by_module < 0 or args.profile < 0:
        parser.error("--by_module and --profile must be >= 0")
    for variant in args.variant or [""]:
        overrides = shlex.split(args.base) + shlex.split(variant)
        result = measure(args.config, overrides, args.steps, args.by_module, args.profile)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
