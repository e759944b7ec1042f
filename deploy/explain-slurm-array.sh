#!/usr/bin/env bash
# Explain a large image set in 4 shards as a Slurm job array, then merge:
#   sbatch deploy/explain-slurm-array.sh MODEL IMAGES OUT
#   sbatch --dependency=afterok:<array job id> --wrap \
#     "finelens merge OUT/shard-0 OUT/shard-1 OUT/shard-2 OUT/shard-3 --out OUT/explain"
# Shard i (SLURM_ARRAY_TASK_ID, 0-based with --array=0-3) takes the images whose path hashes to i.
#SBATCH --job-name=finelens-explain
#SBATCH --array=0-3
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
set -euo pipefail
model=$1 images=$2 out=$3
n=4
finelens explain "$model" "$images" \
    --methods saliency,integrated_gradients,grad_cam \
    --shard "${SLURM_ARRAY_TASK_ID}/${n}" \
    --out "${out}/shard-${SLURM_ARRAY_TASK_ID}" --force
