"""How local is a VQ tokenizer? Fraction of tokens that differ between world sources and targets vs pixels that do.

  python benchmarks/token_locality.py --checkpoint workdir/vq32_2x --num 64

A perfectly local tokenizer changes only the tokens whose pixels change; every extra changed token is one an
editor must re-predict instead of copying from the source.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a tokenizer_vq run")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()

    from editing_jax.data.world import edits
    from editing_jax.methods import module_kwargs
    from editing_jax.methods.tokenizer import images_to_float
    from editing_jax.models.vq import VQModel
    from editing_jax.train import checkpoint

    run = checkpoint.load_trained(args.checkpoint)
    vq = VQModel(**module_kwargs(run.config.model))
    variables = {"params": run.inference_params, **run.model_state}
    size = int(run.config.data.size)
    samples = [edits.generate_sample(args.split, 0, i, edits.WorldConfig(size=size)) for i in range(args.num)]
    encode = lambda images: np.asarray(vq.apply(variables, images_to_float(images), method=VQModel.encode))  # noqa: E731
    source = encode(np.stack([s.source_image for s in samples]))  # [N, h, w]
    target = encode(np.stack([s.target_image for s in samples]))
    token_changed = (source != target).mean(axis=(1, 2))  # [N]
    pixel_changed = np.asarray([s.edit_mask.mean() for s in samples])  # [N]
    factor = vq.downsample_factor
    # Tokens whose own pixel block changed: the lower bound for a perfectly local tokenizer.
    blocks = np.stack([s.edit_mask.reshape(size // factor, factor, size // factor, factor).any(axis=(1, 3))
                       for s in samples])  # fmt: skip
    report = {
        "command": f"python benchmarks/token_locality.py --checkpoint {args.checkpoint} --num {args.num}",
        "tokens_changed": float(token_changed.mean()),
        "tokens_whose_pixels_changed": float(blocks.mean()),
        "pixels_changed": float(pixel_changed.mean()),
        "tokens_changed_outside_changed_blocks": float(((source != target) & ~blocks).mean()),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
