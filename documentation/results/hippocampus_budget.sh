#!/usr/bin/env bash
# The quality protocol of documentation/results/hippocampus.md: each trainer on Hippocampus fold 0, 10 epochs x 25
# iterations at the plans' batch (the *_budget trainers), nnScd_seed=0 unless set, CPU; nnU-Net's final validation
# (42 cases, with mirroring) writes fold_0/validation/summary.json. Trainers run one at a time; finished ones are
# skipped. Another seed needs its own nnUNet_results (the same fold and validation cases, other weights and patches).
# Usage: nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... [nnScd_seed=1] bash hippocampus_budget.sh TRAINER ...
# (after nnScd_convert_MSD_dataset -i Task04_Hippocampus && nnScd_plan_and_preprocess -d 4 -c 3d_fullres)
set -euo pipefail
BIN=$(dirname "$0")/../../.venv/bin
export nnScd_seed=${nnScd_seed:-0} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1} nnUNet_def_n_proc=${nnUNet_def_n_proc:-2}
for trainer in "$@"; do
  summary="$nnUNet_results/Dataset004_Hippocampus/${trainer}__nnUNetPlans__3d_fullres/fold_0/validation/summary.json"
  if [ -f "$summary" ]; then  # done, unless another seed's run sits there
    grep -q "\"seed\": \"$nnScd_seed\"" "$(dirname "$summary")/../debug.json" && { echo "$trainer: done"; continue; }
    echo "$trainer: $nnUNet_results holds a run of another nnScd_seed; give seed $nnScd_seed its own nnUNet_results" >&2
    exit 1
  fi
  start=$(date +%s)
  "$BIN/nnScd_train" 4 3d_fullres 0 -tr "$trainer" -device cpu
  echo "$trainer: $(( $(date +%s) - start )) s (training and final validation)"
done
