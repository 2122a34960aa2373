"""Benchmark: the scoring path's CPU per request, this checkout against another, same run.

``Scorer.score_rows`` is what ``POST /v1/score`` runs for a request once its body is
parsed: the feature read (Redis), row building and the forward pass. On a loaded shared
machine the endpoint's latency is mostly run-queue wait; the CPU one request costs this
path is the figure that moves with the code. The bench starts a real Redis (and broker),
seeds it as ``bench/serving_load.py`` does, publishes one model per kind (built as the
learner builds it), then, per kind and candidate count, runs ``--requests`` requests in a
fresh process of each checkout in turn (``--reps`` alternating runs, medians): CPU and
wall milliseconds per request and Redis round trips per request.

    .venv/bin/python bench/scoring_path.py --baseline-repo /tmp/main [--kinds deepfm fgcnn]
        [--candidates 1 100] [--requests 300] [--reps 3]

``--baseline-repo`` is another checkout (``git worktree add /tmp/main main``); its own
``bench/serving_load.py`` builds the request bodies, so both sides score the same ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(repo: str, redis_url: str, store_dir: str, name: str, cands: int, n: int) -> None:
    """One checkout's scoring path: ``n`` requests after 100 warm-up ones; prints JSON."""
    sys.path[:0] = [repo, f"{repo}/bench"]
    import torch

    torch.set_num_threads(1)
    import serving_load as sl

    from core.redis_client import connect_async
    from core.settings import Settings
    from serving.app import build_context
    from serving.scoring import parse_score_request

    settings = Settings(model_store=store_dir, partitions=4, redis=redis_url, model_name=name)

    async def main() -> dict:
        client = connect_async(redis_url, decode_responses=False)
        # with the URL, as serving builds it: feature reads on RoundTrips, tracked in memory
        ctx = build_context(settings, client, redis_url=redis_url)
        ctx.holder.start()
        served = ctx.holder.current
        reqs = [parse_score_request(b, 1000) for b in sl.make_bodies(500, cands, 2000, 1600)]
        for r in reqs[:100]:
            await ctx.scorer.score_rows(served, r)
        store = ctx.scorer.store
        trips = store.round_trips
        c0, w0 = time.process_time(), time.perf_counter()
        for k in range(n):
            await ctx.scorer.score_rows(served, reqs[k % len(reqs)])
        out = {"cpu": (time.process_time() - c0) / n * 1000,
               "wall": (time.perf_counter() - w0) / n * 1000,
               "trips": (store.round_trips - trips) / n}
        ctx.holder.close()
        await client.aclose()
        return out

    print(json.dumps(asyncio.run(main())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-repo", required=True)
    ap.add_argument("--kinds", nargs="+", default=["deepfm", "fgcnn"])
    ap.add_argument("--candidates", type=int, nargs="+", default=[100, 1])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        repo, url, store_dir, name, cands, n = args.child
        child(repo, url, store_dir, name, int(cands), int(n))
        return
    sys.path.insert(0, str(REPO / "bench"))
    import serving_load as sl

    from learner.store import LocalModelStore

    repos = {"this": str(REPO), "baseline": str(Path(args.baseline_repo).resolve())}
    print("| model | candidates | code | CPU ms/req | wall ms/req | Redis round trips/req | "
          "CPU ms/req per run | load |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    stack = sl.start_stack()
    try:
        sl.seed_redis(stack, 2000, 1600, 40_000)
        for kind in args.kinds:
            name = f"scoring-{kind}"
            store = LocalModelStore(stack.settings.model_store, name)
            model = sl.make_model(stack.builder, kind, 0, 0, settings=stack.settings)
            schema = stack.builder.schema
            store.publish({"model": model.state_dict()}, config={"model": model.spec.to_dict()},
                          feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                          rows_trained=1000, watermarks={}, metrics={"auc": 0.7})
            for cands in args.candidates:
                runs: dict[str, list[dict]] = {k: [] for k in repos}
                for _ in range(args.reps):  # alternating
                    for label, repo in repos.items():
                        out = subprocess.run(
                            [sys.executable, __file__, "--baseline-repo", args.baseline_repo,
                             "--child", repo, stack.redis_url, str(stack.settings.model_store),
                             name, str(cands), str(args.requests)],
                            capture_output=True, text=True, cwd=repo, check=True)
                        runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
                for label, rs in runs.items():
                    med = {k: statistics.median(r[k] for r in rs) for k in ("cpu", "wall", "trips")}
                    each = ", ".join(f"{r['cpu']:.2f}" for r in rs)
                    print(f"| {kind} | {cands} | {label} | {med['cpu']:.2f} | {med['wall']:.2f} | "
                          f"{med['trips']:.2f} | {each} | {os.getloadavg()[0]:.1f} |", flush=True)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
