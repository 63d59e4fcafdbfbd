#!/bin/bash
# Question: does RandConv help on two held-out sites, and do 80 epochs beat 40 at 144 px?
# Answer (2026-11-27): RandConv -0.051 (BUS-UCLM) and -0.062 (BrEaST) seed for seed, off;
# 80 epochs +0.058 in 4 of 4 seeds. docs/studies/2026-11-27-randconv-and-80-epochs.md
# The GPU run behind that note's table, as it
# ran on a lent machine, and the machinery that seed_study_gpu.sh's job list runs on:
#   .venv/bin/python studies/seed_study.py shrink --out gpu_data     # here, once
#   then there, from the repository root with gpu_data/ beside it and $OUT an output folder:
#   bash studies/recipe_study_gpu.sh
#   (the first call's time ran out before the 80-epoch runs; they ran in a second call with a
#   four-line job list: JOBS=FILE THREADS=4 SLOTS=4 TRAIN_S=250 bash studies/recipe_study_gpu.sh)
# Then here: .venv/bin/python studies/seed_study.py report OUT/SITE-*.npz   (one site at a time)
# Each line of the job list is NAME (RECIPE-sSEED) and its train_sites.py options; every run
# is at SIZE px (default 144) with masks and layer4 stride 1 (the demo recipe). A recipe whose name starts
# with "b" holds BrEaST-Lesions-USG out (trains on BUSI + BUS-UCLM) instead of BUS-UCLM, so a
# change is judged on two hospitals nobody trained on. Runs still training after TRAIN_S
# seconds are stopped and left out; scores and logs land in $OUT.
set -u
export D=${D:-gpu_data} PYTHONUNBUFFERED=1 THREADS=${THREADS:-1}
nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
rm -rf runs; mkdir -p runs   # a warm machine keeps the previous call's runs: start clean
: > runs/jobs.txt
if [ -n "${JOBS:-}" ]; then cp "$JOBS" runs/jobs.txt; else   # JOBS=FILE: another job list (a dry run)
for s in 0 1 2 3 4 5; do
  echo "B40-s$s --epochs 40 --seed $s" >> runs/jobs.txt
  echo "R40-s$s --epochs 40 --seed $s --randconv 0.5" >> runs/jobs.txt
done
for s in 0 1 2 3; do
  echo "bB40-s$s --epochs 40 --seed $s --held-out breast-lesions-usg" >> runs/jobs.txt
  echo "bR40-s$s --epochs 40 --seed $s --held-out breast-lesions-usg --randconv 0.5" >> runs/jobs.txt
done
for s in 0 1 2 3; do echo "B80-s$s --epochs 80 --seed $s" >> runs/jobs.txt; done
fi
one() { name=$1; shift; python3 benchmarks/train_sites.py --data $D --threads $THREADS --img-size ${SIZE:-144} --masks \
        --layer4-stride 1 "$@" --keep runs/$name --json runs/$name.json > runs/$name.log 2>&1
        echo "done $name rc=$? $(date +%T)"; }
export -f one
timeout ${TRAIN_S:-370} xargs -P ${SLOTS:-12} -L 1 bash -c 'one "$@"' _ < runs/jobs.txt
# score each recipe on the site it never trained on (the checkpoint is named by its training sites)
for r in $(ls -d runs/*-s* 2>/dev/null | sed 's#runs/##; s#-s[0-9]*$##' | sort -u); do
  for pt in busi+breast-lesions-usg:bus-uclm busi+bus-uclm:breast-lesions-usg; do
    if ls runs/$r-s*/${pt%%:*}.pt > /dev/null 2>&1; then
      timeout ${SCORE_S:-110} python3 studies/seed_study.py scores runs/$r-s*/${pt%%:*}.pt --data $D --device ${DEVICE:-cuda} \
        --site ${pt##*:} --out "$OUT/${pt##*:}-$r.npz" > runs/scores-$r.log 2>&1 &
    fi
  done
done
wait
tail -n 2 runs/scores-*.log
grep -h "epoch(s) in" runs/*.log
tar czf "$OUT/logs.tgz" runs/*.json runs/*.log
