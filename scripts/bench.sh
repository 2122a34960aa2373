#!/usr/bin/env bash
# make bench: the benchmarks of BENCHMARKS.md that finish in minutes, one after another,
# each printing its own table (figures and the baseline measured in the same run).
# The long ones (soak, served AUC, ablations) are listed at the end with their commands.
# BENCH_ONLY="schemas_decode click_path" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
mkdir -p artifacts/bench
QUICK=(
  "schemas_decode"
  "features_store --events 30000 --batch 1000 --partitions 4"
  "click_path --events 20000 --repeat 3"
  "learner_flops --threads 1"
  "learner_throughput"
  "detection_throughput"
  "detection_eval"
  "serving_load"
)
for entry in "${QUICK[@]}"; do
  name=${entry%% *}
  if [[ -n "${BENCH_ONLY:-}" && " $BENCH_ONLY " != *" $name "* ]]; then continue; fi
  echo "== bench/$name.py ${entry#"$name"}"
  read -r -a argv <<< "$entry"
  $PY "bench/${argv[0]}.py" "${argv[@]:1}" 2>&1 | tee "artifacts/bench/$name.txt"
  echo
done
cat <<'TXT'
Long benchmarks (tens of minutes each; see BENCHMARKS.md for what they measure):
  .venv/bin/python bench/served_movielens.py
  .venv/bin/python bench/learner_movielens.py --seeds 0 1 2
  .venv/bin/python bench/soak.py --minutes 10 --rate 200 --qps 10
  .venv/bin/python bench/codes_ablation.py --seeds 3
A/B against another checkout (alternating, same Redis):
  .venv/bin/python bench/click_handler.py --ab ../main --rounds 3
TXT
