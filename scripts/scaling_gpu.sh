#!/usr/bin/env bash
# The paper-scale scaling sweep (paper Fig. 2 and 4) on one node of 8 GPUs: seven AstroPT sizes, 1M to 830M
# parameters, each pretrained on the same number of tokens through torchrun (DDP; FSDP where a model does not fit),
# then embedded, probed and fitted with L(C) = L_inf + (C0/C)^alpha (bootstrap errors, R², checks in scaling.md).
#
#   bash scripts/scaling_gpu.sh                        # mock survey of 500k galaxies, made first if missing
#   DATA=/path/to/Smith42-galaxies bash scripts/scaling_gpu.sh   # any data set `astrolom inspect` reads
#
# Knobs (environment): DATA, OUT, N (mock galaxies), SIZE (stamp px), PATCH, PRESETS, TOKENS (per model), GPUS, BATCH.
# Not run by CI and not yet run by us (no GPU node here). Sizing: 500k mock galaxies of 64 px (~25 GB of float32
# shards, ~10 min to make on 16 cores) = 32M tokens per epoch; 3e8 tokens per model (~9 epochs, ~9,300 steps of
# 512) costs 6 N T = 1.5e18 FLOPs for 830m, about 20-40 min on 8 H100-class GPUs, the whole sweep about 1-2 h.
# Check the checks table in OUT/scaling.md (R² >= 0.95, parameters off their bounds) before quoting the fit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scaling_gpu}
N=${N:-500000}
SIZE=${SIZE:-64}
PATCH=${PATCH:-8}
DATA=${DATA:-$OUT/survey}
PRESETS=${PRESETS:-1m,5m,12m,21m,89m,309m,830m}
TOKENS=${TOKENS:-3e8}
GPUS=${GPUS:-8}
BATCH=${BATCH:-512}

if [[ ! -e "$DATA/_survey.json" && "$DATA" == "$OUT/survey" ]]; then
    python -m astrolom survey --n "$N" --size "$SIZE" --out "$DATA"
fi

# 64 px stamps / 8 px patches = 64 tokens (the paper's central 8x8 token count); eval every 250 steps gives the
# frontier its points; log-spaced checkpoints are kept for probing along training.
python -m astrolom scaling --data "$DATA" --presets "$PRESETS" --out "$OUT" --tokens "$TOKENS" \
    --launcher "torchrun --standalone --nproc_per_node $GPUS" \
    data.patch_size="$PATCH" train.batch_size="$BATCH" train.precision=bf16 train.compile=true \
    train.eval_interval=250 train.eval_samples=4096 train.checkpoint_interval=2000 train.log_checkpoints=8
