"""Test-wide environment: 8 fake CPU devices for sharding tests, fast XLA compiles, and no model hub access."""

import os

# The tests' tiny models spend most of their time in XLA compiles, not in running: LLVM's optimization level 0 halves
# the compile times and cuts the suite's end-to-end modules by ~30 % (docs/RESULTS.md, "A slower machine"). Flags
# already in XLA_FLAGS win.
_TEST_XLA_FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0"}
_flags = os.environ.get("XLA_FLAGS", "").split()
_flags += [f"{name}={value}" for name, value in _TEST_XLA_FLAGS.items()
           if not any(flag.startswith(name + "=") for flag in _flags)]  # fmt: skip
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
