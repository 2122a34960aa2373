#!/usr/bin/env bash
# make demo: start the embedded stack, replay MovieLens-100K into it, show where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
HW=.venv/bin/headwater
export HF_HUB_OFFLINE=1
# The embedded broker's log lives in memory only: state kept from an earlier run (Redis,
# model store) would not match the new log, so every demo starts from a clean slate.
echo "== wiping state from earlier runs (headwater reset)"
$HW reset
echo
echo "== starting the embedded stack"
$HW up
echo
echo "== replaying MovieLens-100K (items, then ratings as click events in time order)"
$HW replay movielens ${DEMO_REPLAY_ARGS:-}
echo
echo "== waiting for the pipeline to drain"
for i in $(seq 1 30); do
  sleep 2
  if $HW lag --json | .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
lag = sum(p.get("lag") or 0 for g in r.get("groups", []) for p in g.get("partitions", []))
sys.exit(0 if lag == 0 else 1)'; then break; fi
done
$HW status
echo
$HW lag || true
echo
echo "== one item's online features"
$HW features get item:50 --json | sed -n 1,40p  # sed reads it all: no broken pipe
cat <<MSG

The stack keeps running:
  dashboard        http://127.0.0.1:${HEADWATER_HTTP_PORT:-8000}/
  score            curl -s -XPOST localhost:${HEADWATER_HTTP_PORT:-8000}/v1/score -d '{"user_id":"1","candidates":["50","181"]}'
  status / lag     .venv/bin/headwater status ; .venv/bin/headwater lag --watch
  audit detection  .venv/bin/headwater ship-audit ../shared/datasets/audit/dev03_ingress_revshell.log --host vm
                   curl -s localhost:${HEADWATER_HTTP_PORT:-8000}/v1/alerts
  stop             .venv/bin/headwater down   (or make down; keeps Redis and the model store)
  wipe             .venv/bin/headwater reset  (stop and wipe every piece of kept state)
MSG
