"""Shared by the parity tests against the PyTorch reference classes."""

import numpy as np


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|, in float64; the shapes must agree."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
