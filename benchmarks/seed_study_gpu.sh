#!/bin/bash
# The GPU run behind docs/model-quality.md's "Many seeds" table, as it ran on a lent machine:
#   .venv/bin/python benchmarks/seed_study.py shrink --out gpu_data     # here, once
#   then there, from the repository root with gpu_data/ beside it and $OUT an output folder:
#   bash benchmarks/seed_study_gpu.sh            (second batch: SEEDS="6 7 8 9 10 11 12 13" LONG="" TAG=-b)
# Then here: .venv/bin/python benchmarks/seed_study.py report OUT/*.npz
# 8 runs at a time share the GPU and 2 CPU threads each (16 cores); runs still training after
# TRAIN_S seconds are stopped and left out; the scores and the runs' logs land in $OUT.
set -u
export D=${D:-gpu_data} PYTHONUNBUFFERED=1
SEEDS=${SEEDS:-0 1 2 3 4 5} LONG=${LONG-0 1 2 3} TAG=${TAG:-}
nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
mkdir -p runs
: > runs/jobs.txt
for s in $SEEDS; do
  echo "A40-s$s --epochs 40 --seed $s" >> runs/jobs.txt
  echo "M40-s$s --epochs 40 --seed $s --mixstyle 0.5" >> runs/jobs.txt
done
for s in $LONG; do echo "A80-s$s --epochs 80 --seed $s" >> runs/jobs.txt; done
one() { name=$1; shift; python3 benchmarks/train_sites.py --data $D --threads 2 --masks --layer4-stride 1 "$@" \
        --keep runs/$name --json runs/$name.json > runs/$name.log 2>&1; echo "done $name rc=$? $(date +%T)"; }
export -f one
timeout ${TRAIN_S:-390} xargs -P ${SLOTS:-8} -L 1 bash -c 'one "$@"' _ < runs/jobs.txt
for r in A40 M40 A80; do
  if ls runs/$r-s*/*.pt > /dev/null 2>&1; then
    timeout 110 python3 benchmarks/seed_study.py scores runs/$r-s*/*.pt --data $D --device cuda \
      --out "$OUT/$r$TAG.npz" > runs/scores-$r.log 2>&1 &
  fi
done
wait
tail -n 3 runs/scores-*.log
grep -h "epoch(s) in" runs/*.log
tar czf "$OUT/logs$TAG.tgz" runs/*.json runs/*.log
