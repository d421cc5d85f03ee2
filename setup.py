"""Installs editing_jax: instruction-based image editing research in JAX/Flax."""

import setuptools

setuptools.setup(
    name="editing_jax",
    version="0.1.0",
    description="JAX/Flax library and CLI for instruction-based image editing research.",
    packages=setuptools.find_packages(include=["editing_jax", "editing_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array-record",
        "ml-collections",
        "numpy",
        "scipy",
        "pillow",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "ruff"],
        "parity": ["torch==2.13.0", "diffusers", "transformers", "safetensors"],
    },
    entry_points={"console_scripts": ["editing-jax=editing_jax.cli:main"]},
)
