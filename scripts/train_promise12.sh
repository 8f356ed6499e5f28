#!/usr/bin/env bash
# Train the shipped models on the training split of the shared PROMISE12 data (after
# scripts/groundtruth_promise12.sh) and write their model cards. Usage:
#   bash scripts/train_promise12.sh 2|3 [extra 'agentreg train' arguments, e.g. --set iterations=4000]
# Resumes from work/train<dim>d/checkpoint.pt when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
DIM=${1:?dimension 2 or 3}; shift
DATA=${DATA:-../shared/data/promise12/grid128}
WORK=${WORK:-work}
NAME=prostate-${DIM}d
mkdir -p Resources/Models "$WORK/train${DIM}d"
agentreg train --groundtruth "$WORK/gt${DIM}d" --sdm "$WORK/sdm${DIM}d.npz" --config compact \
  --data "$DATA" --split Resources/promise12_split.json \
  --checkpoint "$WORK/train${DIM}d/checkpoint.pt" --out "Resources/Models/$NAME.pt" "$@"
cp "$WORK/train${DIM}d/loss.csv" "Resources/Models/$NAME.loss.csv"
agentreg info "Resources/Models/$NAME.pt" --name "$NAME" --card "Resources/Models/$NAME.md" > /dev/null
