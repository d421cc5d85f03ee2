"""editing-jax train --config configs/tokenizer/vq.py:size=32 --workdir workdir/vq32

VQ tokenizer (the MGT's image tokens) trained on the synthetic world's source and target images.

Variants (comma-separated): `size=32|64` canvas size (default 32); `patch` the parameter-free patch tokenizer
(a token is the code of one pixel block, 16x16 tokens, codebook learned by EMA k-means from k-means++ seeds: local,
so an edit changes only the tokens it touches; the quickstart's tokenizer); `quick` the conv model's smaller model and
shorter schedule (32 px); `tiny` a CI-sized model and a few steps.
"""

import ml_collections

from editing_jax import config_lib
from editing_jax.train import defaults

VARIANTS = (
    "size=32",
    "size=64",
    "size=32,quick",
    "size=32,tiny",
    "size=32,patch",
    "size=64,patch",
    "size=32,patch,tiny",
)


def get_config(arg=None):
    args = config_lib.parse_config_arg(arg, allowed=("size", "quick", "tiny", "patch"))
    size = int(args.get("size", 32))
    tiny = bool(args.get("tiny", False))
    quick = bool(args.get("quick", False))
    patch = bool(args.get("patch", False))

    config = ml_collections.ConfigDict()
    config.method = "tokenizer_vq"
    config.seed = 0

    # Each example gives two training images (source and target).
    config.data = defaults.world_data_config(size, batch_size=8 if tiny else 16, num_eval_examples=16 if tiny else 512)
    # 16x16 tokens: 2x downsampling at 32 px, 4x at 64 px (the MGT can halve the grid again, as Meissonic does).
    # At 32 px, 4x (8x8 tokens) reached only 81 % verifier success on reconstructions vs 99.6 % for 2x
    # (docs/RESULTS.md). Sized to train in about half an hour on 2 CPU cores.
    levels = (32, 64) if size <= 32 else (32, 64, 64)
    config.model = ml_collections.ConfigDict(
        {
            "block_out_channels": (16, 32) if tiny else levels,
            "layers_per_block": 1,
            "norm_num_groups": 8 if tiny else 16,
            "use_mid_block": True,
            "mid_block_attention": False,
            "norm_type": "group",  # 'layer': per-pixel norms keep tokens local (slower to train; RESULTS.md)
            "latent_channels": 16 if tiny else 32,
            "codebook_size": 64 if tiny else 1024,
            "code_dim": 8 if tiny else 16,
            "commitment_weight": 0.25,
            "ema_decay": 0.99,
            "ema_epsilon": 1e-5,
            "l2_normalize_codes": True,
            "dead_code_threshold": 0.01,
            "restart_sampling": "uniform",
            "codebook_init": "normal",
            "dtype": "float32",
            "param_dtype": "float32",
        }
    )
    config.loss = ml_collections.ConfigDict({"recon_loss": "l1+l2"})
    config.optimizer = defaults.optimizer_config(learning_rate=2e-3, warmup_steps=10 if tiny else 100)
    config.train = defaults.train_config(
        num_steps=20 if tiny else 2500,
        log_every=5 if tiny else 50,
        checkpoint_every=10 if tiny else 500,
        sample_every=10 if tiny else 500,
        eval_every=0,
    )
    if quick:
        if tiny or size != 32:
            raise config_lib.ConfigError("the 'quick' variant is for size=32 without 'tiny'")
        config.model.block_out_channels = (16, 32)
        config.model.norm_num_groups = 8
        config.model.codebook_size = 512
        config.optimizer = defaults.optimizer_config(learning_rate=4e-3, warmup_steps=50)
        config.train.num_steps = 1500
        config.train.checkpoint_every = 400
        config.train.sample_every = 400
    if patch:
        if quick:
            raise config_lib.ConfigError("'patch' and 'quick' are different tokenizers; pick one")
        patch_size = size // 16
        config.model = ml_collections.ConfigDict(
            {
                "encoder_type": "patch",
                "decoder_type": "patch",
                "patch_size": patch_size,
                "codebook_size": 64 if tiny else 1024,
                "code_dim": 3 * patch_size**2,
                "commitment_weight": 0.0,  # Nothing upstream of the codebook to commit.
                "ema_decay": 0.99,
                "ema_epsilon": 1e-5,
                "l2_normalize_codes": False,  # Pixel blocks: Euclidean k-means.
                "dead_code_threshold": 0.01,
                "restart_sampling": "error",
                "codebook_init": "kmeans++",
                "dtype": "float32",
                "param_dtype": "float32",
            }
        )
        config.data.batch_size = 8 if tiny else 64
        config.train.num_steps = 20 if tiny else 300  # ~1 min on 2 CPU cores: 100 % verifier success (RESULTS.md)
    config.mesh = defaults.mesh_config()
    config.logical_axis_rules = defaults.logical_axis_rules()
    return config
