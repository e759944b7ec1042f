#!/usr/bin/env bash
# Audit a large image set in 4 shards as a Slurm job array, then merge (the merge's exit status
# is the audit's: 0 every check passes, 1 a check fails, 2 an error):
#   sbatch deploy/audit-slurm-array.sh MODEL BASE DATA OUT
#   sbatch --dependency=afterok:<array job id> --wrap \
#     "finelens merge OUT/shard-0 OUT/shard-1 OUT/shard-2 OUT/shard-3 --out OUT/audit"
# Shard i (SLURM_ARRAY_TASK_ID, 0-based with --array=0-3) audits the images whose path hashes
# to i; every shard must be given the same arguments but --shard and --out.
#SBATCH --job-name=finelens-audit
#SBATCH --array=0-3
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
set -euo pipefail
model=$1 base=$2 data=$3 out=$4
n=4
finelens audit "$model" --base "$base" --data "$data" --limit 100000 \
    --shard "${SLURM_ARRAY_TASK_ID}/${n}" \
    --out "${out}/shard-${SLURM_ARRAY_TASK_ID}" --force
