"""Ceiling of a perfectly local tokenizer: k-means over non-overlapping image patches, decoded by code lookup.

  python benchmarks/patch_kmeans_tokenizer.py --patch 2 --codes 1024

Fits the codebook on patches of world train images (initialized from distinct rounded patches, Lloyd iterations),
then reports PSNR and verifier success on reconstructed held-out targets, and how many tokens change between source
and target vs how many pixels do (a local tokenizer changes only tokens whose own patch changes).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train_examples", type=int, default=2000)
    parser.add_argument("--test_examples", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument(
        "--init",
        choices=("distinct", "random"),
        default="distinct",
        help="seed codes from distinct rounded patches or from random patches",
    )
    args = parser.parse_args()

    from editing_jax.data.world import edits, verifier
    from editing_jax.models.flow_dit import pack_latents, unpack_latents

    def patches(images):  # [N, S, S, 3] -> [N * (S / P)^2, P * P * 3]
        return np.asarray(pack_latents(images, args.patch)).reshape(-1, 3 * args.patch**2)

    world = edits.WorldConfig(size=args.size)
    to_float = lambda x: x.astype(np.float32) / 127.5 - 1.0  # noqa: E731
    train = [edits.generate_sample("train", 0, i, world) for i in range(args.train_examples)]
    images = to_float(
        np.concatenate([np.stack([s.source_image for s in train]), np.stack([s.target_image for s in train])])
    )
    vectors = patches(images)  # [N, P*P*3]
    distinct = np.unique(np.round(vectors * 16) / 16, axis=0) if args.init == "distinct" else vectors
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(distinct[rng.choice(len(distinct), args.codes, replace=len(distinct) < args.codes)])
    data = jnp.asarray(vectors)

    def nearest(x, codes):  # x [N, D], codes [K, D] -> [N]
        return jnp.argmin(jnp.sum(x**2, 1)[:, None] - 2 * x @ codes.T + jnp.sum(codes**2, 1)[None], axis=1)

    @jax.jit
    def lloyd(codes):
        assign = nearest(data, codes)
        sums = jax.ops.segment_sum(data, assign, args.codes)
        counts = jax.ops.segment_sum(jnp.ones(data.shape[0]), assign, args.codes)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], codes), jnp.sum(counts > 0)

    for _ in range(args.iterations):
        codebook, used = lloyd(codebook)

    test = [edits.generate_sample("test", 0, i, world) for i in range(args.test_examples)]
    grid = args.size // args.patch

    def tokenize(x):
        return np.asarray(nearest(jnp.asarray(patches(x)), codebook)).reshape(len(x), grid, grid)

    targets = to_float(np.stack([s.target_image for s in test]))
    target_tokens = tokenize(targets)
    source_tokens = tokenize(to_float(np.stack([s.source_image for s in test])))
    codes = np.asarray(codebook)[target_tokens].reshape(len(test), grid * grid, -1)  # [N, g*g, P*P*3]
    recon = np.asarray(unpack_latents(codes, args.size, args.size, args.patch))  # [N, S, S, 3]
    recon_uint8 = np.clip(np.round((recon + 1) * 127.5), 0, 255).astype(np.uint8)
    report = {
        "command": f"python benchmarks/patch_kmeans_tokenizer.py --patch {args.patch} --codes {args.codes} --init {args.init}",
        "codes_used": int(used),
        "psnr": float(10 * np.log10(4.0 / np.mean((recon - targets) ** 2))),
        "verifier_success": float(verifier.verify(list(recon_uint8), [s.edit.target for s in test]).success.mean()),
        "tokens_changed": float((target_tokens != source_tokens).mean()),
        "pixels_changed": float(np.mean([s.edit_mask.mean() for s in test])),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
