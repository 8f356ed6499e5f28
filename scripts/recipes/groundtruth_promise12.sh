#!/usr/bin/env bash
# Ground truth and SDMs on the training split of the shared PROMISE12 data, and their results file
# $WORK/groundtruth.md (WORK defaults to work/). About 2 h on 2 cores. Reruns resume from the per-pair cache.
# It writes only under $WORK: with SHIP=1 the results file is also copied to results/groundtruth.md (replacing
# the committed one). It never touches the shipped models in Resources/Models.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/promise12/grid128}
WORK=${WORK:-work}
SHIP=${SHIP:-0}
SPLIT=Resources/promise12_split.json
# The shipped models' ground truth: crops on each subject's prostate; 2-D with the paper's metric (points), 3-D
# with the masks' signed distance maps (results/groundtruth_metric.md)
agentreg groundtruth "$DATA" --split $SPLIT --geometry paper --crop organ --organ prostate --dim 2 --iterations 200 --max-pairs 542 --seed 0 --out "$WORK/gt2d"
agentreg groundtruth "$DATA" --split $SPLIT --geometry paper --crop organ --organ prostate --dim 3 --metric distance --iterations 200 --resolutions 2 --max-pairs 300 --seed 0 --out "$WORK/gt3d"
agentreg sdm "$WORK/gt2d" --modes 15 --out "$WORK/sdm2d.npz" --report-modes 5,10,15,25,40 --report "$WORK/gt2d/report.md"
agentreg sdm "$WORK/gt3d" --modes 25 --out "$WORK/sdm3d.npz" --report-modes 5,10,15,25,40 --report "$WORK/gt3d/report.md"
{ echo "# Ground truth and statistical deformation model on PROMISE12 (training split)"; echo;
  echo "Made by \`bash scripts/recipes/groundtruth_promise12.sh\` (split: \`$SPLIT\`; data: \`$DATA\`). Distances in voxels; Dice on the model grid."; echo;
  cat "$WORK/gt2d/report.md"; echo; cat "$WORK/gt3d/report.md"; } > "$WORK/groundtruth.md"
if [ "$SHIP" = 1 ]; then
  mkdir -p results
  cp "$WORK/groundtruth.md" results/groundtruth.md
  echo "SHIP=1: copied $WORK/groundtruth.md to results/groundtruth.md" >&2
fi
