"""Metric writers: JSONL (always), TensorBoard event files (tensorboardX), PNG image grids."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

import numpy as np


def read_scalar(workdir: str | pathlib.Path, key: str) -> dict[int, float]:
    """`key`'s logged values by step, read back from the `metrics.jsonl` a `MetricWriter` wrote in `workdir`."""
    values = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[int(record["step"])] = float(record[key])
    return values


class MetricWriter:
    """Appends scalar metrics to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard`."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close().
        self._tb = None
        if tensorboard:
            import tensorboardX

            self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> pathlib.Path:
        """Writes a uint8 [H, W, 3] grid to `workdir/samples/<name>_<step>.png` (and TensorBoard)."""
        from editing_jax.data import image_io

        path = self.workdir / "samples" / f"{name}_{int(step):07d}.png"
        image_io.write_image_atomic(path, image)
        if self._tb is not None:
            self._tb.add_image(name, image, int(step), dataformats="HWC")
        return path

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
