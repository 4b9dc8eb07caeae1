#!/usr/bin/env bash
# `make demo`: the whole toolkit on the built-in phantoms, under runs/demo/ (run inside the runtime):
#   phantoms (20 patients, 512x512) -> make data (5 folds) -> train fold 0 (fast profile, from
#   scratch) -> caffe test + per-patient 3D Dice + figures.
# Settings (environment): DEMO_OUT (default runs/demo), DEMO_N (20), DEMO_SEED (0), DEMO_FOLD (0),
# DEMO_PROFILE (fast), DEMO_JOBS (nproc). A rerun reuses finished phantoms and data and starts the
# training over (--restart), so the timing below is always the whole pipeline's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${DEMO_OUT:-runs/demo}
n=${DEMO_N:-20}
seed=${DEMO_SEED:-0}
fold=${DEMO_FOLD:-0}
profile=${DEMO_PROFILE:-fast}
jobs=${DEMO_JOBS:-$(nproc)}
run="$out/fold$fold"
t0=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }

stage "phantoms: $n patients -> $out/raw"
python3 -m data_prep.phantoms --out "$out/raw" --n "$n" --seed "$seed" --jobs "$jobs"

stage "data: crops, 8x augmentation, 5 folds -> $out/data"
python3 -m data_prep.make_data --raw "$out/raw" --data "$out/data" --folds 5 --seed "$seed" --jobs "$jobs"

stage "train fold $fold, profile $profile -> $run"
python3 -m tools.train --fold "$fold" --data "$out/data" --run "$run" --profile "$profile" --restart

stage "evaluate fold $fold: caffe test, per-patient 3D Dice, figures"
python3 -m tools.evaluate --fold "$fold" --data "$out/data" --run "$run"

stage "done in $(( $(date +%s) - t0 )) s (profile $profile)"
echo "per-patient table: $run/per_patient.csv; metrics: $run/metrics.json"
echo "figures: $run/figures/ ($(ls "$run/figures" | tr '\n' ' '))"
