"""Peak temporary memory and step time of the Dense GRPO / Flow-GRPO train step vs the window length k.

  python benchmarks/dense_grpo_memory.py --ks 1 2 4 8 --out benchmarks/results/dense_grpo_memory.json

Builds the `configs/cogniedit/sft.py:size=32` flow editor with random weights (a random KL autoencoder of the
`configs/tokenizer/kl.py:size=32` shape, rank-4 LoRA), compiles `value_and_grad` of the GRPO loss for each k with
and without rematerialization, and reports XLA's temp buffer size of the compiled step (what grows with k) and the
median wall time of 3 steps. Rewards come from a cheap host function (mean brightness), so the timing is the model's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def build(batch_size: int):
    from editing_jax import config_lib
    from editing_jax.data import pipeline
    from editing_jax.data.world import edits
    from editing_jax.methods import flow_edit, grpo, module_kwargs
    from editing_jax.models.autoencoder import AutoencoderKL
    from editing_jax.text.tokenizer import world_vocabulary

    config = config_lib.load_config("configs/cogniedit/sft.py:size=32", [])
    kl_config = config_lib.load_config("configs/tokenizer/kl.py:size=32", [])
    config.tokenizer.model_json = json.dumps(kl_config.model.to_dict())
    config.text.vocab = " ".join(world_vocabulary())
    with config.unlocked():
        config.model.lora_rank, config.model.lora_alpha = 4, 4.0
    model = flow_edit.build_model(config)
    source = pipeline.WorldSource("train", batch_size, 0, edits.WorldConfig(size=32))
    batch = grpo.prepare_batch(model, pipeline.collate([source[i] for i in range(batch_size)]))
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype != object}
    tokenizer = AutoencoderKL(**module_kwargs(kl_config.model)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    sft = flow_edit.make_objective(model, tokenizer, cfg_dropout=0.0, timestep_sampling="uniform",
                                   settings=flow_edit.FlowSettings()).init(jax.random.key(1), arrays)  # fmt: skip
    sft = nn.meta.unbox(sft)
    lora, base = grpo.split_lora(sft["params"]["dit"])
    state = {"base_dit": base, "text_encoder": sft["params"]["text_encoder"], "tokenizer": sft["tokenizer"],
             "latent_stats": sft["latent_stats"]}  # fmt: skip
    return model, {"lora": lora}, state, arrays


def brightness_reward(source, edited, target, source_scene, target_scene, edit_mask):
    del source, target, source_scene, target_scene, edit_mask
    value = np.asarray(edited, np.float32).mean(axis=(1, 2, 3)) / 17.0
    return np.stack([value, np.zeros_like(value)], axis=-1).astype(np.float32)


def measure(model, params, state, batch, *, algorithm: str, k: int, remat: bool, num_steps: int, group: int):
    from editing_jax.methods import grpo

    settings = grpo.GRPOSettings(algorithm=algorithm, window=k, num_steps=num_steps, group_size=group, remat=remat)
    loss = grpo.make_loss(model, settings, reward_fn=brightness_reward)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    compiled = step.lower(params, state, batch, jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    times = []
    for i in range(4):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, state, batch, jax.random.key(i)))
        times.append(time.perf_counter() - start)
    return {"algorithm": algorithm, "k": k, "remat": remat, "temp_mib": memory.temp_size_in_bytes / 2**20,
            "step_seconds": statistics.median(times[1:])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=2, help="inputs per step (each sampled --group times)")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--num_steps", type=int, default=10)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    model, params, state, batch = build(args.batch)
    rows = []
    for k in args.ks:
        for algorithm, remat in (("dense_grpo", True), ("dense_grpo", False), ("grpo", True)):
            row = measure(model, params, state, batch, algorithm=algorithm, k=k, remat=remat,
                          num_steps=args.num_steps, group=args.group)  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"command": "python benchmarks/dense_grpo_memory.py --ks " + " ".join(map(str, args.ks)),
              "samples_per_step": args.batch * args.group, "num_steps": args.num_steps, "rows": rows}  # fmt: skip
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
