#!/usr/bin/env bash
# Train a model on the training split of the shared PROMISE12 data (after scripts/recipes/groundtruth_promise12.sh)
# with the configuration agentreg train uses by default (converge, as the shipped models) and write its model card.
# Usage:
#   bash scripts/recipes/train_promise12.sh 2|3 [extra 'agentreg train' arguments, e.g. --set iterations=4000]
# Writes $WORK/models/prostate-<dim>d.pt, .loss.csv and .md (WORK defaults to work/); resumes from
# $WORK/train<dim>d/checkpoint.pt when it exists. It never touches the shipped models in Resources/Models:
# only with SHIP=1 are the three files copied there, replacing the shipped ones, e.g.
#   SHIP=1 bash scripts/recipes/train_promise12.sh 3
# The shipped 3-D model was trained on a GPU machine (scripts/recipes/gpu_session.py configs: --configs recover, 59,479
# batches), its checkpoint brought back to $WORK/train3d/checkpoint.pt, and made into a bundle here, without
# training further, by
#   bash scripts/recipes/train_promise12.sh 3 --config recover --set iterations=59479 --localiser Resources/Models/localiser-3d.pt
set -euo pipefail
cd "$(dirname "$0")/../.."
DIM=${1:?dimension 2 or 3}; shift
DATA=${DATA:-../shared/data/promise12/grid128}
WORK=${WORK:-work}
SHIP=${SHIP:-0}
NAME=prostate-${DIM}d
OUT="$WORK/models"
mkdir -p "$OUT" "$WORK/train${DIM}d"
agentreg train --groundtruth "$WORK/gt${DIM}d" --sdm "$WORK/sdm${DIM}d.npz" \
  --data "$DATA" --split Resources/promise12_split.json --organ prostate \
  --checkpoint "$WORK/train${DIM}d/checkpoint.pt" --out "$OUT/$NAME.pt" "$@"
cp "$WORK/train${DIM}d/loss.csv" "$OUT/$NAME.loss.csv"
agentreg info "$OUT/$NAME.pt" --name "$NAME" --card "$OUT/$NAME.md" > /dev/null
if [ "$SHIP" = 1 ]; then
  mkdir -p Resources/Models
  cp "$OUT/$NAME.pt" "$OUT/$NAME.loss.csv" "$OUT/$NAME.md" Resources/Models/
  echo "SHIP=1: copied $OUT/$NAME.{pt,loss.csv,md} into Resources/Models (the shipped model is replaced)" >&2
else
  echo "model written to $OUT/$NAME.pt (card $OUT/$NAME.md); Resources/Models is unchanged (SHIP=1 copies it there)" >&2
fi
