#!/usr/bin/env bash
# Rejection-sampling fine-tuning from a flow SFT base against its two controls, then the held-out comparison.
#
#   bash benchmarks/rejection_sft.sh BASE N K STEPS      e.g.  bash benchmarks/rejection_sft.sh fsft12k_base 4096 4 400
#
# BASE is a flow_edit run under workdir/ trained on the KL autoencoder workdir/kl32_4x. Rejection sampling of the
# first N training examples from up to K noises (benchmarks/rejection_samples.py), then four STEPS-step fine-tunes
# from BASE at lr 1e-4: `own` (the accepted examples, the editor's own edits as targets), `world` (the same examples,
# the world's targets), `full` (plain SFT on the whole world) and `mix` (half own accepted edits, half world examples),
# and benchmarks/cogniedit_eval.py of the base and the four arms on 256 `test` examples. Logs go to workdir/logs/,
# results to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 4 ]]; then
  echo "usage: bash benchmarks/rejection_sft.sh BASE N K STEPS" >&2
  exit 2
fi
BASE=$1 N=$2 K=$3 STEPS=$4
TAG=${BASE}_n${N}k${K}s${STEPS}
mkdir -p workdir/logs
python benchmarks/rejection_samples.py --run "workdir/$BASE" --num "$N" --seeds "$K" \
  --out "workdir/self_own_$BASE.npz" --out_ground_truth "workdir/self_world_$BASE.npz" \
  --report "benchmarks/results/rejection_samples_${BASE}_n${N}k${K}.json" > "workdir/logs/rs_$BASE.log" 2>&1
for ARM in own world full mix; do
  case $ARM in
    own) DATA=(--config.data.source=self_samples "--config.data.data_dir=workdir/self_own_$BASE.npz") ;;
    world) DATA=(--config.data.source=self_samples "--config.data.data_dir=workdir/self_world_$BASE.npz") ;;
    full) DATA=() ;;
    mix) DATA=(--config.data.source=self_samples "--config.data.data_dir=workdir/self_own_$BASE.npz"
               --config.data.self_sample_fraction=0.5) ;;
  esac
  editing-jax train --config configs/cogniedit/sft.py:size=32 --workdir "workdir/rft_${ARM}_$TAG" \
    "--config.init_from=workdir/$BASE" --config.tokenizer.checkpoint=workdir/kl32_4x \
    "--config.train.num_steps=$STEPS" --config.optimizer.learning_rate=1e-4 --config.optimizer.warmup_steps=25 \
    --config.data.num_eval_examples=0 --config.train.eval_every=0 --config.train.sample_every=0 "${DATA[@]}" \
    > "workdir/logs/rft_${ARM}_$TAG.log" 2>&1
done
python benchmarks/cogniedit_eval.py --runs "workdir/$BASE" "workdir/rft_own_$TAG" "workdir/rft_world_$TAG" \
  "workdir/rft_full_$TAG" "workdir/rft_mix_$TAG" --num 256 --out "benchmarks/results/cogniedit_eval_rft_$TAG.json"
