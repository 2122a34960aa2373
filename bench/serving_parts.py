"""Benchmark: where one ``/v1/score`` request's serving CPU goes, in one run.

Four figures per candidate count, each serving CPU per request (net of idle where a
serving process runs its background threads):

- the endpoint as shipped (``headwater serve``, one process, impression logging on);
- the same endpoint with ``HEADWATER_IMPRESSION_LOG=false``;
- ``Scorer.score_rows`` alone in this process (feature read from the same Redis, rows,
  forward), as ``bench/scoring_path.py`` runs it;
- a bare aiohttp handler that reads a JSON body and answers JSON: the HTTP floor.

The first minus the second is impression logging; the second minus the third and the
fourth is the request's own handling (middleware, metrics, thread hand-offs). The two
endpoint variants alternate windows (``--reps``), on one broker, Redis and model.

    .venv/bin/python bench/serving_parts.py [--kind deepfm] [--candidates 1 100]
        [--seconds 3] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_load as sl  # noqa: E402

from headwater.servers import free_port, stop_pid  # noqa: E402
from learner.store import LocalModelStore  # noqa: E402

BARE = """
import json, sys
from aiohttp import web

async def score(request):
    body = json.loads(await request.read())
    return web.json_response({"model_version": "1", "request_id": "r",
                              "scores": [0.5] * len(body["candidates"])})

app = web.Application()
app.router.add_post("/v1/score", score)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def _publish(stack: sl.Stack, kind: str) -> str:
    s = stack.settings
    name = f"bench-{kind}"
    store = LocalModelStore(s.model_store, name, keep=s.keep_versions)
    model = sl.make_model(stack.builder, kind, 0, 0, settings=s)
    schema = stack.builder.schema
    store.publish({"model": model.state_dict()}, config={"model": model.spec.to_dict()},
                  feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                  rows_trained=1000, watermarks={}, metrics={"auc": 0.7})
    return name


def _in_process(stack: sl.Stack, name: str, bodies: list[bytes], n: int) -> float:
    """CPU ms per request of ``Scorer.score_rows`` in this process."""
    import torch

    from core.redis_client import connect_async
    from core.settings import Settings
    from serving.app import build_context
    from serving.scoring import parse_score_request

    torch.set_num_threads(1)
    settings = Settings(model_store=stack.settings.model_store, partitions=stack.settings.partitions,
                        redis=stack.redis_url, model_name=name)

    async def main() -> float:
        client = connect_async(stack.redis_url, decode_responses=False)
        ctx = build_context(settings, client)
        ctx.holder.start()
        served = ctx.holder.current
        reqs = [parse_score_request(b, 1000) for b in bodies]
        for r in reqs[:100]:
            await ctx.scorer.score_rows(served, r)
        c0 = time.process_time()
        for k in range(n):
            await ctx.scorer.score_rows(served, reqs[k % len(reqs)])
        cpu = (time.process_time() - c0) / n * 1000
        ctx.holder.close()
        await client.aclose()
        return cpu

    return asyncio.run(main())


def _bare(bodies: list[bytes], seconds: float, reps: int) -> list[float]:
    """CPU ms per request of the bare aiohttp handler."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE, str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(sl.run_raw_load(base, bodies, 1, 0.5))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        p = psutil.Process(proc.pid)
        out = []
        for _ in range(reps):
            c0 = sum(p.cpu_times()[:2])
            r = asyncio.run(sl.run_raw_load(base, bodies, 1, seconds))
            out.append((sum(p.cpu_times()[:2]) - c0) / r.requests * 1000)
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="deepfm")
    ap.add_argument("--candidates", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000, help="in-process requests per count")
    args = ap.parse_args()

    stack = sl.start_stack()
    stacks: dict[str, sl.Stack] = {}
    try:
        sl.seed_redis(stack, 2000, 1600, 40000)
        name = _publish(stack, args.kind)
        for label, log in (("endpoint", "true"), ("endpoint, impressions off", "false")):
            st = dataclasses.replace(stack, serving=None, settings=stack.settings.model_copy(
                update={"http_port": free_port()}))
            sl.start_serving(st, workers=1, HEADWATER_MODEL_NAME=name,
                             HEADWATER_SERVE_BATCH_ROWS=0, HEADWATER_IMPRESSION_LOG=log)
            stacks[label] = st
        for st in stacks.values():
            asyncio.run(sl.run_raw_load(st.base, sl.make_bodies(50, 1, 2000, 1600), 1, 2.0))
        idle = sl.idle_rates(stacks)
        print(f"{args.kind}: idle serving CPU-s/s "
              + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()), flush=True)
        rows = []
        for cands in args.candidates:
            bodies = sl.make_bodies(500, cands, 2000, 1600)
            got: dict[str, list[float]] = {k: [] for k in stacks}
            for _ in range(args.reps):
                for label, st in stacks.items():
                    r = sl.measured_load(st, bodies, 1, args.seconds, 1, idle[label])[0]
                    got[label].append((r.server_cpu - r.server_idle) / r.requests * 1000)
            got["score_rows in process"] = [_in_process(stack, name, bodies, args.requests)]
            got["bare aiohttp handler"] = _bare(bodies, args.seconds, args.reps)
            for label, v in got.items():
                rows.append((cands, label, float(np.median(v)), v))
                print(f"{args.kind} {cands:>4} candidates | {label:26s} | "
                      f"{np.median(v):.3f} ms CPU/request | windows {[round(x, 3) for x in v]}",
                      flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f}; {sl.environment()}")
        print("\n| candidates | what | serving CPU ms per request (median) |")
        print("|---:|---|---:|")
        for cands, label, med, _ in rows:
            print(f"| {cands} | {label} | {med:.3f} |")
    finally:
        for st in stacks.values():
            if st.serving is not None:
                stop_pid(st.serving.pid, proc=st.serving)
        stack.stop()


if __name__ == "__main__":
    main()
