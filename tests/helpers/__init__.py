"""Shared test helpers."""

import importlib.util
import types


def load_benchmark(name: str) -> types.ModuleType:
    """The script `benchmarks/<name>.py` as a module (benchmarks/ is not a package)."""
    module_spec = importlib.util.spec_from_file_location(name, f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
