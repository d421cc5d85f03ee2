"""Config builder shared by `configs/editmgt/*.py` (text-to-image pretraining and edit fine-tuning)."""

from __future__ import annotations

import ml_collections

from editing_jax import config_lib
from editing_jax.train import defaults

# Words of the longest world caption (4 objects, "a small red outlined circle in the top left" each, plus the
# background) are 44; instructions have at most 12.
CAPTION_MAX_LENGTH = 48
INSTRUCTION_MAX_LENGTH = 24


def text_config(tiny: bool, max_length: int = INSTRUCTION_MAX_LENGTH) -> ml_collections.ConfigDict:
    """The `text` section shared by the editors: the offline word tokenizer and the small text encoder."""
    return ml_collections.ConfigDict(
        {
            "vocab": "",  # Filled from the world's grammar when training starts (space-separated words).
            "max_length": max_length,
            "num_hash_buckets": 64,
            "width": 32 if tiny else 64,
            "num_layers": 1 if tiny else 2,
            "num_heads": 2 if tiny else 4,
            "pooled_dim": 32 if tiny else 64,
            "word_skip": False,  # see TextEncoder.word_skip
            # False: the MGT loss sends no gradient into the text encoder (AdamW's decoupled weight decay still acts
            # on its params). Trained at 2e-3 the encoder merges the color words ("red", "blue" nearly equal word
            # states), after which no object can be found by its name (docs/RESULTS.md, EditMGT: grounding).
            "train_encoder": True,
            # True: the text cross-attention reads its own copy of the encoder, frozen at init (no gradient; weight
            # decay still acts), while the joint attention reads the trained one (MaskedGenerativeTransformer
            # .gate_text_dim; edit stage; EditMGT only).
            "gate_encoder": False,
        }
    )


def editmgt_config(arg: str | None, *, stage: str) -> ml_collections.ConfigDict:
    """EditMGT config for `stage` ('t2i' or 'edit') with variants `size=32|64`, `quick`, `long`, `tiny`."""
    args = config_lib.parse_config_arg(arg, allowed=("size", "quick", "long", "tiny"))
    size = int(args.get("size", 32))
    long = bool(args.get("long", False))
    quick = bool(args.get("quick", False)) or long  # `long` trains the quick model for longer.
    tiny = bool(args.get("tiny", False))
    if size not in (32, 64):
        raise config_lib.ConfigError(f"size must be 32 or 64, got {size}")
    if long and (stage != "edit" or tiny):
        raise config_lib.ConfigError("the `long` variant is an edit-stage schedule of the full-size quick model")

    edit = stage == "edit"
    config = ml_collections.ConfigDict()
    config.method = "editmgt"
    config.stage = stage
    config.seed = 0
    config.init_from = ""  # A previous stage's run (e.g. t2i pretraining) whose params initialize this one.
    config.tokenizer = ml_collections.ConfigDict(
        {
            "checkpoint": f"workdir/vq{size}",  # A trained VQ run (configs/tokenizer/vq.py).
            "model_json": "",  # Filled from the tokenizer run when training starts; travels with checkpoints.
        }
    )
    # t2i reads whole target captions; a 24-word limit cut 3- and 4-object captions after the second object.
    config.text = text_config(tiny, CAPTION_MAX_LENGTH if stage == "t2i" else INSTRUCTION_MAX_LENGTH)
    config.text.gate_encoder = long
    # The 15-minute quick budget buys more from steps than from width and depth: one double and one single block of
    # width 64 train 2.3x as many steps (2,800) as 2 + 2 blocks of width 128 in the same time, and edit better
    # (docs/RESULTS.md, EditMGT: "A smaller model, more steps").
    if tiny:
        heads, head_dim, num_layers = 2, 16, 1
    elif quick:
        # `long` doubles the depth: 2 + 2 blocks at 1.32x the step time beat 1 + 1 blocks at equal time, at the
        # 1-hour budget and at the 2-hour one (docs/RESULTS.md, EditMGT: "Two blocks of each kind at the 2-hour budget").
        heads, head_dim, num_layers = 2, 32, 2 if long else 1
    else:
        heads, head_dim, num_layers = 4, 32, 2
    num_single_layers = num_layers
    config.model = ml_collections.ConfigDict(
        {
            "num_layers": num_layers,
            "num_single_layers": num_single_layers,
            "num_heads": heads,
            "head_dim": head_dim,
            "embed_dim": 32 if tiny else 64,
            "downsample": True,
            "micro_cond_dim": 16,
            "num_micro_conds": 5,
            "axes_dims_rope": (4, 6, 6) if tiny else (8, 12, 12),
            # Meissonic uses 10000; on a from-scratch 8x8 grid a small base lets image tokens find their condition
            # token (same position) sooner. qk_norm_scale_init > 1 (we used 3) makes attention so peaked at init that
            # image tokens never attend to the text (docs/RESULTS.md, EditMGT: text sensitivity).
            "rope_theta": 10.0,
            "qk_norm_scale_init": 1.0,
            "source_concat": True,  # not in EditMGT; see MaskedGenerativeTransformer.source_concat
            "source_skip": True,  # not in EditMGT; see MaskedGenerativeTransformer.source_skip
            "source_copy": True,  # not in EditMGT; see MaskedGenerativeTransformer.source_copy
            "code_content": True,  # not in EditMGT; see MaskedGenerativeTransformer.code_content_dim
            "fused_code_head": False,  # not in EditMGT; see MaskedGenerativeTransformer.fused_code_head
            # Editing reads the text per token as well (+4.7 points held-out at 5,000 steps with the gate loss,
            # docs/RESULTS.md, EditMGT: "Where the text is read").
            "text_cross_attention": edit,  # not in EditMGT; see MaskedGenerativeTransformer.text_cross_attention
            "text_cross_single": False,  # not in EditMGT; see MaskedGenerativeTransformer.text_cross_single
            # `long` grounds the text cross-attention in the source and a frozen copy of the text encoder and adds the
            # text code score: 30.9 % held-out over two seeds at 9,400 steps against 23.4 % without (docs/RESULTS.md,
            # EditMGT: "The grounded model at 9,400 steps"), 49.2 % at 28,000, 66.8 % at 40,000 ("40,000 steps"); with
            # 2 + 2 blocks 70.9 % at 30,300 steps on 1,024 test examples (61.8 % for 1 + 1 blocks at 40,000, seed 1),
            # 78.5 / 82.4 % at 48,000 (seeds 1 / 0: "Two hours on the Zen 4", "A second seed of `long`").
            "text_cross_source": long,  # not in EditMGT; see MaskedGenerativeTransformer.text_cross_source
            "text_cross_positions": False,  # not in EditMGT; see MaskedGenerativeTransformer.text_cross_positions
            "absolute_positions": False,  # not in EditMGT; see MaskedGenerativeTransformer.absolute_positions
            "text_gate_copy": False,  # not in EditMGT; see MaskedGenerativeTransformer.text_gate_copy
            "text_code_score": long,  # not in EditMGT; see MaskedGenerativeTransformer.text_code_score
            "text_code_token_gate": False,  # not in EditMGT; see MaskedGenerativeTransformer.text_code_token_gate
            "token_change_head": False,  # not in EditMGT; see MaskedGenerativeTransformer.token_change_head
            "pixel_head": False,  # not in EditMGT; see MaskedGenerativeTransformer.pixel_channels (needs a patch VQ)
            "mlp_ratio": 4.0,
            "zero_init_modulation": True,
            "dtype": "float32",
            "param_dtype": "float32",
        }
    )
    # edit_weight: CE weight of masked tokens that differ from the source (1 = the paper's plain average).
    # focus_prob: share of rows whose changed tokens are all masked (methods/editmgt.py `_mask_tokens`).
    # min_mask_rate: the masking rate's arccos density is truncated to [min_mask_rate, 1] (1: always all masked).
    # grounding_weight: weight of the per-token "does the instruction change this token" loss on the copy score.
    # content_weight: weight of the squared error of a regression of the target code vectors (> 0 adds the MGT's
    # content_head; needs model.code_content).
    # code_smoothing: tau > 0 trains on soft targets over codes near the target code (methods/editmgt.py make_loss).
    # pixel_weight: weight of the squared error of the pixel head's predicted block (needs model.pixel_head).
    # text_gate_weight: weight of the per-grid-cell "is this cell edited" loss on the gates of model.text_cross_attention.
    # token_change_weight: weight of the per-token "does this token change" loss of model.token_change_head.
    # caption_change_weight: weight of the loss of a head predicting target minus source caption word counts from the
    # pooled instruction embedding (text/encoder.py CaptionChangeHead).
    # changed_row_balance: every row's masked changed tokens get the same total weight (methods/editmgt.py
    # balance_changed_rows), so small object edits weigh as much as whole-background ones; changed_row_power < 1
    # balances partially (a row's changed tokens weigh in proportion to count ** (1 - power)).
    config.loss = ml_collections.ConfigDict(
        {
            "cfg_dropout": 0.1,
            "edit_weight": 1.0 if stage == "t2i" else 3.0,
            "focus_prob": 0.0,
            "min_mask_rate": 0.0,
            "grounding_weight": 0.0,
            "content_weight": 0.0,
            "text_gate_weight": 1.0 if edit else 0.0,
            "code_smoothing": 0.0,
            "pixel_weight": 0.0,
            "caption_change_weight": 0.0,
            "changed_row_balance": False,
            "changed_row_power": 1.0,
            "token_change_weight": 0.0,
        }
    )
    # Editing decodes in one argmax step by default: on every trained edit model we measured it matches or beats the
    # 12-step MaskGIT schedule in success, with lower plain L1 (docs/RESULTS.md, EditMGT: decoding). Generation (t2i)
    # has no source to copy and keeps the iterative schedule.
    config.sampling = ml_collections.ConfigDict(
        {
            "num_steps": 1 if edit else (4 if tiny else 12),
            "guidance_scale": 0.0,
            "temperature": 2.0,
            "token_temperature": 0.0 if edit else 1.0,
            "gamma": 1.0,
            # The text cross-attention's gate is a probability (trained by loss.text_gate_weight), so it is read
            # as is ('none' scaling) and held below 0.5; joint attention maps (t2i, older runs) are rescaled.
            "region_hold_threshold": 0.5 if edit else 0.3,
            "attention_layers": (0, num_layers + num_single_layers),
            "text_positions": "all",
            "filter": "gaussian",
            "filter_sigma": 1.0,
            "filter_radius": 1,
            "keep_peaks": True,
            # 'max' keeps a flat map (an edit of the whole background) above lambda; 'minmax' always holds a region.
            "map_scaling": "none" if edit else "minmax",
            "attention_source": "text_cross" if edit else "joint",  # editmgt.ATTENTION_SOURCES
            # Untouched token cells show the input's pixels, not its VQ reconstruction (whose error was over half of
            # the quickstart's preservation L1; docs/RESULTS.md, EditMGT: "The tokenizer's floor").
            "paste_source": edit,
        }
    )
    config.data = defaults.world_data_config(size, batch_size=4 if tiny else 16, num_eval_examples=8 if tiny else 256)
    config.optimizer = defaults.optimizer_config(learning_rate=2e-3, warmup_steps=5 if tiny else 100,
                                                 weight_decay=0.01)  # fmt: skip
    # quick: the quickstart's schedule, sized to its 15-minute budget on 2 CPU cores (1,800 steps of the larger model
    # until the eleventh session, 1,200 until the fourteenth, 2,800 until the faster argmax of the twenty-fourth,
    # 3,100 until the rank-2 products of the twenty-fifth; docs/RESULTS.md, EditMGT: Quickstart). long: the issue's
    # 2-hour budget for the longer config on the CI machine (48,000 steps of 2 + 2 blocks: 109–114 min on the Zen 4
    # CPU-2 of the thirty-fifth session on; 9,400 steps until the twenty-first session, 28,000 until the
    # twenty-seventh, 40,000 of 1 + 1 blocks until the thirty-fifth, 30,300 of 2 + 2 until the thirty-sixth;
    # docs/RESULTS.md, EditMGT).
    num_steps = 10 if tiny else (48000 if long else 4200 if quick else 5000)
    config.train = defaults.train_config(
        num_steps=num_steps,
        log_every=5 if tiny else 50,
        checkpoint_every=10 if tiny else 500,
        sample_every=10 if tiny else 1000,
        eval_every=0,
    )
    config.mesh = defaults.mesh_config()
    config.logical_axis_rules = defaults.logical_axis_rules()
    return config
