#!/bin/bash
# Question: what does the demo recipe give on BUS-UCLM over 14 seeds, with and without MixStyle,
# and at 80 epochs? Answer (2026-11-27): 0.770 +- 0.016 at 40 epochs; MixStyle -0.021 seed for
# seed; 80 epochs +0.020. docs/studies/2026-11-27-many-seeds-gpu.md
# The GPU run behind that note's table: its job list, run by
# recipe_study_gpu.sh's machinery (128 px, 8 runs at a time with 2 CPU threads each).
#   .venv/bin/python studies/seed_study.py shrink --out gpu_data     # here, once
#   then there, from the repository root with gpu_data/ beside it and $OUT an output folder:
#   bash studies/seed_study_gpu.sh            (second batch: SEEDS="6 7 8 9 10 11 12 13" LONG="")
# Then here: .venv/bin/python studies/seed_study.py report OUT/bus-uclm-*.npz
# (The run of 2026-11-27 used an earlier copy of this machinery; recipe_study_gpu.sh now holds it.)
set -u
SEEDS=${SEEDS:-0 1 2 3 4 5} LONG=${LONG-0 1 2 3}
jobs=$(mktemp); trap 'rm -f "$jobs"' EXIT
for s in $SEEDS; do
  echo "A40-s$s --epochs 40 --seed $s" >> "$jobs"
  echo "M40-s$s --epochs 40 --seed $s --mixstyle 0.5" >> "$jobs"
done
for s in $LONG; do echo "A80-s$s --epochs 80 --seed $s" >> "$jobs"; done
JOBS="$jobs" SIZE=128 THREADS=2 SLOTS=8 TRAIN_S=${TRAIN_S:-390} SCORE_S=${SCORE_S:-110} \
  bash "$(dirname "$0")/recipe_study_gpu.sh"
