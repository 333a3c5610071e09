#!/usr/bin/env bash
# Full held-out and robustness evaluation of the built-in models (what `make eval` runs):
# renders each phantom set (seeds never used in training) into DATA, then `pacs-node evaluate`
# writes models/<model>/eval/<set>/{metrics.json,report.md,*.png} and refreshes the model card.
# Usage: models/eval.sh [MODEL...]   (default: every built-in model); DATA=/tmp/pacs-node-eval
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
DATA=${DATA:-/tmp/pacs-node-eval}
# model  modality  set  first-seed  last-seed (exclusive)
SETS="
xr-chest-lungs DX heldout 7000 7020
xr-chest-lungs DX noisy 7100 7108
xr-chest-lungs DX finepixel 7200 7208
xr-chest-lungs DX department 7000 7020
ct-torso-organs CT heldout 5000 5020
ct-torso-organs CT thin 5100 5108
ct-torso-organs CT thick 5200 5208
ct-torso-organs CT noisy 5300 5308
ct-torso-organs CT cropped 5400 5408
ct-torso-organs CT context 5500 5508
mr-torso-organs MR heldout 6000 6020
mr-torso-organs MR thick 6200 6208
mr-torso-organs MR noisy 6300 6308
mr-torso-organs MR cropped 6400 6408
mr-torso-organs MR context 6500 6508
mr-torso-organs MR sequences 6600 6608
"
want=" ${*:-xr-chest-lungs ct-torso-organs mr-torso-organs} "
echo "$SETS" | while read -r model modality set first last; do
  [ -n "$model" ] && [[ "$want" == *" $model "* ]] || continue
  [ -f "models/$model/models/model.pt" ] || { echo "skip $model: not trained"; continue; }
  dir="$DATA/$model-$set"
  [ -f "$dir/dataset.json" ] || "$BIN/python" -m phantom "$set" "$modality" "$first" "$last" "$dir"
  "$BIN/pacs-node" evaluate "$model" "$dir" --out "models/$model/eval/$set" --models-dir models
done
