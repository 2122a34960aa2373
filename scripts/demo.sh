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
echo
echo "== waiting for the learner to train every replayed row"
.venv/bin/python - <<'PY'
import json, os, sys, time, urllib.request
from tqdm import tqdm

base = f"http://127.0.0.1:{os.environ.get('HEADWATER_HTTP_PORT', '8000')}"

def status():
    # a status read that times out (serving busy on a loaded machine) is retried, never
    # fatal: the wait below is bounded by DEMO_TRAIN_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v1/status", timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError) as exc:
            if time.monotonic() > deadline:
                raise
            print(f"(status read failed: {exc}; retrying)", file=sys.stderr)
            time.sleep(1)

def counts(doc):
    workers = doc["services"].get("worker", [])
    learners = sorted(doc["services"].get("learner", []), key=lambda d: d.get("updated_at") or 0)
    rows = sum(w.get("rows_out_total") or 0 for w in workers)
    lrn = learners[-1] if learners else {}
    done = (lrn.get("rows_trained") or 0) + (lrn.get("rows_dropped") or {}).get("downsampled", 0)
    return rows, done, lrn

deadline = time.monotonic() + float(os.environ.get("DEMO_TRAIN_TIMEOUT", "900"))
rows, done, lrn = counts(status())
with tqdm(total=rows, unit="row", desc="trained", file=sys.stderr) as bar:
    while time.monotonic() < deadline:
        rows, done, lrn = counts(status())
        bar.total = max(rows, 1)
        bar.n = min(done, rows)
        bar.refresh()
        if rows and done >= rows and not lrn.get("pending_rows"):
            break
        time.sleep(1)
print(f"learner: {done} rows trained, model version {lrn.get('model_version')}, "
      f"prequential AUC {lrn.get('prequential_auc') or float('nan'):.4f}, "
      f"served AUC (what /v1/score gets) {lrn.get('served_auc') or float('nan'):.4f}")
PY
echo
$HW status || echo "(headwater status exited non-zero: a service above is down or unhealthy)"
echo
$HW lag || true
echo
echo "== one item's online features"
$HW features get item:50 --json | sed -n 1,40p  # sed reads it all: no broken pipe
echo
echo "== served scores: user 1, four films"
curl -s -XPOST "localhost:${HEADWATER_HTTP_PORT:-8000}/v1/score" \
  -d '{"user_id":"1","candidates":["50","181","100","1"]}'; echo
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
