"""Benchmark: /v1/score overhead against the bare forward pass, and throughput under load.

Starts a real Tansu broker and a real redis-server (``headwater.servers``), seeds Redis
through the online store (``--events`` click events over ``--users`` users and
``--items`` items, item attributes and codes), publishes one checkpoint per model kind
with the learner's ModelStore (built like the learner builds it: the settings' preset,
hashed embeddings of the settings' size), then runs ``python -m headwater serve
--workers W`` as its own processes, once per ``--batch-rows`` setting (dynamic batching
on, and off as the baseline; each its own port, all up at once), and drives ``POST
/v1/score`` from a minimal keep-alive HTTP client (its CPU and the serving processes' CPU
per request are reported) for ``--seconds`` per window, ``--reps`` alternating windows
per configuration (medians reported). With ``--baseline-repo`` the same settings are
also served by another checkout's code (``git worktree add /tmp/main main``): before and
after in the same run, alternating windows.
Candidates are drawn from known items plus 10 % never-seen ones; a tenth of the users
are unknown.

Baselines in the same run, per model:

- bare forward: ``ServedModel.predict`` on rows built once (no HTTP, no JSON, no Redis,
  no row building), median of repeated calls, one torch thread — the model's own cost;
- ceiling: the bare forward at 100 rows in W processes at once (the same cores the W
  serving workers use), batches/s summed — what the cores could score with no serving
  work at all.

Targets (issue 15): one client, p50 <= 2 x bare forward + 1 ms; 16 clients, req/s >=
70 % of the ceiling.

    .venv/bin/python bench/serving_load.py [--kinds fgcnn deepfm] [--workers 2] [--seconds 5] [--reps 3]
        [--batch-rows 1024 0] [--baseline-repo /path/to/main-checkout] [--writes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.settings import Settings  # noqa: E402
from features.store import SyncOnlineStore  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from learner.models import ModelSpec, build_model, preset_head  # noqa: E402
from learner.store import LocalModelStore, ModelStore  # noqa: E402
from serving.app import default_row_builder  # noqa: E402
from serving.holder import ModelHolder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---- the stack ---------------------------------------------------------------------------
@dataclass
class Stack:
    tmp: Path
    broker: object
    redis: object
    settings: Settings
    store: ModelStore
    builder: object
    serving: subprocess.Popen | None = None

    @property
    def kafka(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    @property
    def redis_url(self) -> str:
        return self.redis.extra["url"]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def stop(self) -> None:
        if self.serving is not None:
            stop_pid(self.serving.pid, proc=self.serving)
        self.redis.stop()
        self.broker.stop()


def start_stack(partitions: int = 4) -> Stack:
    tmp = Path(tempfile.mkdtemp(prefix="hw-serving-bench-"))
    broker = start_broker(log_path=tmp / "broker.log")
    redis = start_redis(log_path=tmp / "redis.log")
    settings = Settings(
        model_store=tmp / "models",
        state_dir=tmp / "state",
        http_port=free_port(),
        partitions=partitions,
        kafka=f"{broker.host}:{broker.port}",
        redis=redis.extra["url"],
    )
    builder = default_row_builder(settings)
    store = LocalModelStore(settings.model_store, settings.model_name, keep=settings.keep_versions)
    _create_topic(settings.kafka, settings.topics["model-updates"])
    return Stack(tmp, broker, redis, settings, store, builder)


def _create_topic(bootstrap: str, name: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench")
    try:
        admin.create_topics([NewTopic(name, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()


def seed_redis(stack: Stack, users: int, items: int, events: int, seed: int = 0) -> None:
    import redis as redis_lib

    rng = np.random.default_rng(seed)
    client = redis_lib.Redis.from_url(stack.redis_url)
    online = SyncOnlineStore(client, partitions=stack.settings.partitions)
    genres = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Horror"]
    online.put_item_attributes(
        {
            f"m{i}": {"genres": [genres[i % len(genres)]], "year": 1970 + i % 40}
            for i in range(items)
        },
        ts=time.time() - 86400,
    )
    levels, k = stack.settings.code_levels, stack.settings.vq_k
    for i in range(items):
        online.set_item_codes(
            f"m{i}",
            {"rq": rng.integers(0, 256, levels).tolist(), "vq": rng.integers(0, items, k).tolist()},
            "bench",
        )
    now = time.time()
    per_part = events // stack.settings.partitions
    for p in range(stack.settings.partitions):
        for start in range(0, per_part, 1000):
            batch = []
            for off in range(start, min(start + 1000, per_part)):
                batch.append(_click(rng, f"e{p}-{off}", now - 3600 + off * 0.01, p, off, users,
                                    items, stack.settings.partitions))
            online.apply_batch("clicks", p, batch)
    client.close()


def _click(rng, event_id: str, ts: float, p: int, off: int, users: int, items: int,
           partitions: int) -> dict:
    """One click event of partition ``p`` at offset ``off``: a user of that partition, a
    Zipf-popular item, 20 % clicked."""
    u = int(rng.integers(0, users)) * partitions + p
    return {"event_id": event_id, "ts": ts, "user_id": f"u{u}",
            "item_id": f"m{int(rng.zipf(1.3)) % items}", "label": int(rng.random() < 0.2),
            "offset": off, "sub": 0, "context": {"device": "tv" if off % 3 else "phone"},
            "user": {"age": 18 + u % 50, "gender": "MF"[u % 2]}}


def _write_clicks(redis_url: str, partitions: int, users: int, items: int, rate: float,
                  first_offset: int, stop) -> None:
    """Apply ``rate`` click events/s to the online store, as the worker does, until
    ``stop`` is set (a separate process: its CPU is neither the client's nor serving's)."""
    import redis as redis_lib

    rng = np.random.default_rng(7)
    client = redis_lib.Redis.from_url(redis_url)
    online = SyncOnlineStore(client, partitions=partitions)
    offsets = [first_offset] * partitions
    tick, p = 0.05, 0
    next_at = time.monotonic()
    while not stop.is_set():
        batch = []
        for _ in range(max(1, int(rate * tick))):
            off = offsets[p]
            batch.append(_click(rng, f"w{p}-{off}", time.time(), p, off, users, items, partitions))
            offsets[p] += 1
        online.apply_batch("clicks", p, batch)
        p = (p + 1) % partitions
        next_at += tick
        time.sleep(max(0.0, next_at - time.monotonic()))
    client.close()


def start_writes(stack: Stack, args):
    """``--writes`` events/s into Redis during every window (None: no writer)."""
    if not args.writes:
        return None
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    first = args.events // stack.settings.partitions  # the seeded offsets end there
    proc = ctx.Process(target=_write_clicks, daemon=True, args=(
        stack.redis_url, stack.settings.partitions, args.users, args.items, args.writes,
        first, stop))
    proc.start()
    return stop, proc


def make_model(
    builder, kind: str, buckets: int, seed: int, preset: str = "compact",
    settings: Settings | None = None,
) -> torch.nn.Module:
    """A ranker for the builder's schema. With ``settings``, built as the learner builds
    it (``streams.learner_runner``: the settings' preset, embedding size and buckets)."""
    schema = builder.schema
    if settings is not None:
        from streams.learner_runner import ServiceTrainerSettings

        trainer = ServiceTrainerSettings(
            kind=kind, preset=settings.model_preset, seed=seed,
            embedding={"kind": "hashed", "buckets": settings.embedding_buckets,
                       "dim": settings.embedding_dim},
            dense_norm=settings.model_wide, wide=settings.model_wide,
        ).build(schema.to_json())
        model = trainer.learner.model
        model.eval()
        return model
    head = preset_head(kind, preset)
    dim = head.get("embedding_dim", 1) + (1 if kind == "deepfm" else 0)
    spec = ModelSpec(
        kind,
        schema.categorical,
        schema.dense,
        head,
        {"kind": "hashed", "dim": dim, "buckets": buckets},
    )
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def publish(stack: Stack, model: torch.nn.Module, seed: int, auc: float = 0.7) -> dict:
    schema = stack.builder.schema
    return stack.store.publish(
        {"model": model.state_dict()},
        config={"model": model.spec.to_dict()},
        feature_schema_json=schema.to_json(),
        feature_schema_hash=schema.hash,
        rows_trained=1000 * (seed + 1),
        watermarks={},
        metrics={"auc": auc},
    )


def start_serving(stack: Stack, timeout: float = 180.0, workers: int = 1, repo: Path = REPO,
                  **extra_env) -> None:
    """``python -m headwater serve`` as its own process (the code of checkout ``repo``);
    wait until /readyz says ready (and, with ``workers`` > 1, until every worker has
    answered)."""
    import urllib.request

    s = stack.settings
    env = dict(
        os.environ,
        HEADWATER_SERVE_WORKERS=str(workers),
        **{k: str(v) for k, v in extra_env.items()},
        HEADWATER_KAFKA=stack.kafka,
        HEADWATER_REDIS=stack.redis_url,
        HEADWATER_MODEL_STORE=str(s.model_store),
        HEADWATER_STATE_DIR=str(s.state_dir),
        HEADWATER_HTTP_PORT=str(s.http_port),
        HEADWATER_PARTITIONS=str(s.partitions),
        HEADWATER_LOG_LEVEL="WARNING",
        PYTHONPATH=str(repo),
    )
    log = open(stack.tmp / "serving.log", "ab")  # noqa: SIM115 - owned by the child
    stack.serving = subprocess.Popen(
        [sys.executable, "-m", "headwater", "serve"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + timeout
    seen: set[str | None] = set()
    while time.monotonic() < deadline:
        if stack.serving.poll() is not None:
            raise RuntimeError(f"serving exited; see {stack.tmp / 'serving.log'}")
        try:
            with urllib.request.urlopen(f"{stack.base}/readyz", timeout=1) as r:
                if r.status == 200:
                    seen.add(r.headers.get("X-Headwater-Worker"))
                    if len(seen) >= workers:
                        return
        except OSError:
            pass
        time.sleep(0.05 if seen else 0.2)
    raise RuntimeError(f"serving not ready in {timeout}s; see {stack.tmp / 'serving.log'}")


# ---- load ----------------------------------------------------------------------------------
def make_bodies(
    n_bodies: int, candidates: int, users: int, items: int, seed: int = 1
) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_bodies):
        u = int(rng.integers(0, users * 11 // 10))  # ~10 % unknown users
        cands = [
            f"m{int(i)}" if i < items else f"new{int(i)}"
            for i in rng.integers(0, items * 11 // 10, candidates)
        ]
        out.append(
            json.dumps(
                {"user_id": f"u{u}", "candidates": cands, "context": {"device": "tv"}}
            ).encode()
        )
    return out


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: np.ndarray
    versions: list[str]
    #: CPU seconds of the bench's client and of the serving processes in the window
    cpu: float = float("nan")
    server_cpu: float = float("nan")
    #: the serving processes' idle CPU over the window (their idle rate x its length)
    server_idle: float = 0.0
    #: answered requests per serving worker (its ``X-Headwater-Worker`` header)
    by_worker: dict[str, int] = field(default_factory=dict)

    @property
    def busiest(self) -> float:
        """The busiest worker's share of the answered requests (1/W when spread evenly)."""
        total = sum(self.by_worker.values())
        return max(self.by_worker.values()) / total if total else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return (
            float(np.percentile(self.latencies, q) * 1000) if len(self.latencies) else float("nan")
        )


async def run_load(base: str, bodies: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    import aiohttp

    lat: list[float] = []
    versions: list[str] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def client(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    async with http.post(
                        f"{base}/v1/score", data=body, headers={"Content-Type": "application/json"}
                    ) as resp:
                        payload = await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                dt = time.perf_counter() - t0
                if ok:
                    lat.append(dt)
                    versions.append(json.loads(payload)["model_version"])
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return LoadResult(len(lat) + errors, errors, elapsed, np.asarray(lat), versions)


async def run_raw_load(base: str, bodies: list[bytes], concurrency: int,
                       seconds: float) -> LoadResult:
    """The load of :func:`run_load` from a minimal HTTP/1.1 keep-alive client (one
    connection per client, request bytes built once, responses read by Content-Length),
    so the bench's own CPU stays small next to the server's; ``cpu`` records it."""
    host, port = base.rsplit("//", 1)[1].split(":")
    heads = [
        b"POST /v1/score HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: "
        b"application/json\r\nContent-Length: " + str(len(b)).encode() + b"\r\n\r\n" + b
        for b in bodies
    ]
    lat: list[float] = []
    versions: list[str] = []
    by_worker: Counter = Counter()
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        i = k
        try:
            while time.perf_counter() < deadline:
                msg = heads[i % len(heads)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    writer.write(msg)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length, close, worker = 0, False, ""
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        name = name.strip().lower()
                        if name == b"content-length":
                            length = int(value)
                        elif name == b"connection" and value.strip().lower() == b"close":
                            close = True
                        elif name == b"x-headwater-worker":
                            worker = value.strip().decode()
                    payload = await reader.readexactly(length)
                    ok = head.startswith(b"HTTP/1.1 200")
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok, close = False, True
                dt = time.perf_counter() - t0
                if ok:
                    lat.append(dt)
                    start = payload.find(b'"model_version": "') + 18
                    versions.append(payload[start:payload.find(b'"', start)].decode())
                    by_worker[worker] += 1
                else:
                    errors += 1
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    out = LoadResult(len(lat) + errors, errors, elapsed, np.asarray(lat), versions,
                     by_worker=dict(by_worker))
    out.cpu = time.process_time() - c0
    return out


def serving_cpu(proc: subprocess.Popen | None) -> float:
    """CPU seconds (user + system) of the serving processes so far (supervisor and workers)."""
    import psutil

    if proc is None:
        return 0.0
    try:
        root = psutil.Process(proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
        return total
    except psutil.Error:
        return float("nan")


def measured_load(stack: Stack, bodies: list[bytes], concurrency: int, seconds: float,
                  reps: int, idle_rate: float = 0.0) -> list[LoadResult]:
    """``reps`` windows of the raw client; each with the server's and the client's CPU
    (``idle_rate``: the serving processes' CPU-s/s with no requests, see :func:`idle_rates`)."""
    out = []
    for _ in range(reps):
        # the client's own full collections (this process holds torch, the models and
        # the stacks: ~0.5M objects, ~0.25 s a pass) would stall every client at once
        gc.collect()
        gc.freeze()
        s0 = serving_cpu(stack.serving)
        r = asyncio.run(run_raw_load(stack.base, bodies, concurrency, seconds))
        r.server_cpu = serving_cpu(stack.serving) - s0
        r.server_idle = idle_rate * r.seconds
        out.append(r)
    return out


def idle_rates(stacks: dict[str, Stack], seconds: float = 3.0) -> dict[str, float]:
    """CPU-s/s of each variant's serving processes with no requests (the model watcher's
    and the impression producer's threads, heartbeats), all measured over one window.

    A window's server CPU per request includes this divided by however many requests the
    window got: at a few dozen requests/s on a loaded machine it is milliseconds per
    request. ``server net`` figures subtract it."""
    before = {v: serving_cpu(st.serving) for v, st in stacks.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    dt = time.perf_counter() - t0
    return {v: (serving_cpu(st.serving) - before[v]) / dt for v, st in stacks.items()}


def forward_baseline(
    stack: Stack, version: str, candidates: int, seconds: float = 2.0, store: ModelStore | None = None
) -> float:
    """Median seconds of the bare forward pass for one batch of ``candidates`` rows."""
    holder = ModelHolder(store or stack.store, stack.builder.schema)
    try:
        served = holder.load(version)
    finally:
        holder.close()
    rng = np.random.default_rng(0)
    cat = rng.integers(1, 2**62, size=(candidates, served.n_categorical), dtype=np.int64)
    dense = rng.uniform(0, 3, size=(candidates, served.n_dense)).astype(np.float32)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t0 = time.perf_counter()
        served.predict(cat, dense)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ceiling_worker(args: tuple) -> int:
    """One process of the ceiling: bare forwards of ``rows`` rows until ``end``."""
    root, name, version, schema_json, rows, start, end = args
    torch.set_num_threads(1)
    from features.schema import FeatureSchema

    holder = ModelHolder(LocalModelStore(Path(root), name), FeatureSchema.from_json(schema_json))
    try:
        served = holder.load(version)
    finally:
        holder.close()
    rng = np.random.default_rng(0)
    cat = rng.integers(1, 2**62, size=(rows, served.n_categorical), dtype=np.int64)
    dense = rng.uniform(0, 3, size=(rows, served.n_dense)).astype(np.float32)
    served.predict(cat, dense)
    while time.time() < start:
        time.sleep(0.001)
    n = 0
    while time.time() < end:
        served.predict(cat, dense)
        n += 1
    return n


def forward_ceiling(store: ModelStore, schema, version: str, rows: int, procs: int,
                    seconds: float) -> float:
    """Bare-forward batches/s of ``procs`` processes at once (the cores' ceiling)."""
    import multiprocessing as mp

    start = time.time() + 15.0  # every process loaded and warm before the window opens
    args = (str(store.root), store.model, version, schema.to_json(), rows, start,
            start + seconds)
    with mp.get_context("spawn").Pool(procs) as pool:
        counts = pool.map(_ceiling_worker, [args] * procs)
    return sum(counts) / seconds


def scrape(base: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def median_result(results: list[LoadResult]) -> dict[str, float]:
    return {
        "rps": statistics.median(r.rps for r in results),
        "p50": statistics.median(r.pct(50) for r in results),
        "p99": statistics.median(r.pct(99) for r in results),
        "errors": sum(r.errors for r in results),
        "requests": sum(r.requests for r in results),
        # CPU milliseconds per answered request: the client's and the server's
        "client_ms": statistics.median(r.cpu / max(r.requests, 1) * 1000 for r in results),
        "server_ms": statistics.median(r.server_cpu / max(r.requests, 1) * 1000
                                       for r in results),
        # the same without the serving processes' idle CPU over the window
        "server_net_ms": statistics.median((r.server_cpu - r.server_idle) / max(r.requests, 1)
                                           * 1000 for r in results),
        # the busiest serving worker's share of the requests (0.5 = even over 2 workers)
        "busiest": statistics.median(r.busiest for r in results),
    }


def environment() -> str:
    return (
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs shared with "
        f"other work, Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads 1 (serving default)"
    )


def _turn(stacks: dict, rep: int) -> list:
    """The variants in the order of window ``rep``: rotated by one each window, so every
    variant goes first as often as the others. An A/A run (the same code twice) showed
    the first variant of each round slower at 16 clients: 365 against 499 req/s.

    >>> [k for k, _ in _turn({"a": 1, "b": 2, "c": 3}, 1)]
    ['b', 'c', 'a']
    """
    items = list(stacks.items())
    k = rep % len(items) if items else 0
    return items[k:] + items[:k]


def measure_model(stack: Stack, args, kind: str, workers: int) -> dict:
    """Publish ``kind`` under its own model name, serve it once per ``--batch-rows``
    setting (each its own processes and port, all up at once), measure them in
    alternating windows; one result row per setting."""
    import dataclasses

    settings = stack.settings
    name = f"bench-{kind}"
    store = LocalModelStore(settings.model_store, name, keep=settings.keep_versions)
    model = make_model(stack.builder, kind, 0, 0, settings=settings)
    schema = stack.builder.schema
    manifest = store.publish(
        {"model": model.state_dict()}, config={"model": model.spec.to_dict()},
        feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
        rows_trained=1000, watermarks={}, metrics={"auc": 0.7},
    )
    version = manifest["version"]
    print(f"{kind}: published {version} ({manifest['bytes'] / 1e6:.1f} MB, preset "
          f"{settings.model_preset}, {len(schema.categorical)} fields, {len(schema.dense)} dense)",
          flush=True)
    out: dict = {"kind": kind, "bytes": manifest["bytes"], "by": {}}
    variants = {str(b): (REPO, b) for b in args.batch_rows}
    if args.baseline_repo:  # the same settings served by another checkout's code
        variants.update({f"{args.baseline_label} {b}": (Path(args.baseline_repo), b)
                         for b in args.batch_rows})
    stacks = {
        v: dataclasses.replace(stack, serving=None,
                               settings=settings.model_copy(update={"http_port": free_port()}))
        for v in variants
    }
    try:
        for v, st in stacks.items():
            repo, b = variants[v]
            start_serving(st, workers=workers, repo=repo, HEADWATER_MODEL_NAME=name,
                          HEADWATER_SERVE_BATCH_ROWS=b)
            out["by"][v] = {}
        for st in stacks.values():  # warm every worker before the idle window
            asyncio.run(run_raw_load(st.base, make_bodies(50, 1, args.users, args.items), 4, 1.0))
        idle = idle_rates(stacks)
        out["idle"] = idle
        print(f"{kind}: idle serving CPU-s/s " + ", ".join(f"{v} {r:.3f}" for v, r in idle.items()),
              flush=True)
        for cands in args.candidates:
            bodies = make_bodies(500, cands, args.users, args.items)
            for st in stacks.values():
                asyncio.run(run_raw_load(st.base, bodies, 4, 2.0))  # warm-up (every worker)
            fwd = forward_baseline(stack, version, cands, store=store)
            res: dict = {b: [] for b in stacks}
            for rep in range(args.reps):  # alternating windows, each variant first in turn
                for b, st in _turn(stacks, rep):
                    res[b] += measured_load(st, bodies, 1, args.seconds, 1, idle[b])
            for b in stacks:
                m = median_result(res[b])
                out["by"][b][cands] = {"fwd": fwd, **m}
                print(f"{kind} serving {b} candidates={cands:4d} 1 client: p50 {m['p50']:.2f} "
                      f"ms p99 {m['p99']:.2f} ms ({m['rps']:.0f} req/s, errors {m['errors']}, "
                      f"server CPU {m['server_ms']:.2f} ms/req, net of idle "
                      f"{m['server_net_ms']:.2f}, client {m['client_ms']:.2f}) | "
                      f"bare forward {fwd * 1000:.3f} ms | target p50 <= {2 * fwd * 1000 + 1:.2f} "
                      f"ms | load {os.getloadavg()[0]:.1f}", flush=True)
        bodies = make_bodies(500, args.load_candidates, args.users, args.items)
        for st in stacks.values():  # warm-up at the measured concurrency (every worker)
            asyncio.run(run_raw_load(st.base, bodies, args.clients, 2.0))
        res = {b: [] for b in stacks}
        for rep in range(args.reps):
            for b, st in _turn(stacks, rep):
                (r,) = measured_load(st, bodies, args.clients, args.seconds, 1, idle[b])
                res[b].append(r)
                print(f"  window {rep + 1} {b}: {r.rps:.1f} req/s p99 {r.pct(99):.0f} ms, "
                      f"busiest worker {r.busiest:.0%} of requests", flush=True)
        for b in stacks:
            out["by"][b]["load"] = median_result(res[b])
    finally:
        for st in stacks.values():
            if st.serving is not None:
                stop_pid(st.serving.pid, proc=st.serving, timeout=30)
                st.serving = None
    out["ceiling"] = forward_ceiling(store, schema, version, args.load_candidates, workers,
                                     args.seconds)
    for b in stacks:
        m = out["by"][b]["load"]
        print(f"{kind} serving {b} {args.clients} clients x {args.load_candidates} candidates: "
              f"{m['rps']:.1f} req/s p50 {m['p50']:.1f} ms p99 {m['p99']:.1f} ms errors "
              f"{m['errors']} server CPU {m['server_ms']:.2f} ms/req (net of idle "
              f"{m['server_net_ms']:.2f}) client {m['client_ms']:.2f} busiest worker "
              f"{m['busiest']:.0%} | ceiling {out['ceiling']:.1f} batches/s ({workers} processes) | "
              f"{m['rps'] / out['ceiling'] if out['ceiling'] else float('nan'):.0%} | load {os.getloadavg()[0]:.1f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["fgcnn", "deepfm"],
                    choices=["fgcnn", "ipnn", "deepfm", "lr"])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="serving processes (and ceiling processes); default: the cores")
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement window")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--candidates", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--load-candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=1600)
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--batch-rows", type=int, nargs="+", default=[1024, 0],
                    help="HEADWATER_SERVE_BATCH_ROWS settings compared in the same run "
                         "(0: one forward per request, the baseline)")
    ap.add_argument("--baseline-repo", default=None,
                    help="another checkout (e.g. main's, from git worktree) served with the same "
                         "settings in the same run, its windows alternating with this one's")
    ap.add_argument("--writes", type=float, default=0.0,
                    help="click events/s written to Redis during the windows (as the worker "
                         "writes them; a separate process): the features change under load")
    ap.add_argument("--baseline-label", default="main",
                    help="how the table names the --baseline-repo rows")
    args = ap.parse_args()

    torch.set_num_threads(1)
    stack = start_stack()
    load0 = os.getloadavg()
    try:
        t0 = time.perf_counter()
        seed_redis(stack, args.users, args.items, args.events)
        print(f"seeded Redis with {args.events} clicks in {time.perf_counter() - t0:.1f}s",
              flush=True)
        writer = start_writes(stack, args)
        try:
            results = [measure_model(stack, args, kind, args.workers) for kind in args.kinds]
        finally:
            if writer is not None:
                writer[0].set()
                writer[1].join(10)
    finally:
        stack.stop()
    load1 = os.getloadavg()
    s = stack.settings
    print()
    print(f"{environment()}; serving: --workers {args.workers}, inference inline, feature "
          f"tracking {'on' if s.serve_feature_tracking else 'off'} (TTL cache "
          f"{s.serve_feature_cache_seconds:g}s), {args.writes:g} click events/s written "
          f"meanwhile; models: preset {s.model_preset}, hashed "
          f"{s.embedding_buckets} rows/field x {s.embedding_dim}; {args.reps} windows of "
          f"{args.seconds:g}s, medians; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end")
    print()
    print("| model | serving (code, batch rows) | candidates | bare forward ms | target p50 ms | endpoint p50 ms | "
          "endpoint p99 ms | p50 / forward | server CPU ms/req | server CPU net of idle | "
          "client CPU ms/req | met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        for b, by in r["by"].items():
            for c in args.candidates:
                m = by[c]
                target = 2 * m["fwd"] * 1000 + 1
                print(f"| {r['kind']} | {b} | {c} | {m['fwd'] * 1000:.3f} | {target:.2f} | "
                      f"{m['p50']:.2f} | {m['p99']:.2f} | {m['p50'] / (m['fwd'] * 1000):.1f}x | "
                      f"{m['server_ms']:.2f} | {m['server_net_ms']:.2f} | {m['client_ms']:.2f} | "
                      f"{'yes' if m['p50'] <= target else 'no'} |")
    print()
    print(f"| model | serving (code, batch rows) | {args.clients} clients x {args.load_candidates} candidates req/s "
          f"| p50 ms | p99 ms | errors | server CPU ms/req | server CPU net of idle | client CPU "
          f"ms/req | busiest worker's share | bare-forward ceiling ({args.workers} processes) "
          f"batches/s | ratio | met (>= 70 %) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        for b, by in r["by"].items():
            m = by["load"]
            # no forward finished in the ceiling's window (an overloaded machine): no ratio
            ratio = m["rps"] / r["ceiling"] if r["ceiling"] else float("nan")
            print(f"| {r['kind']} | {b} | {m['rps']:.1f} | {m['p50']:.1f} | {m['p99']:.1f} | "
                  f"{m['errors']} | {m['server_ms']:.2f} | {m['server_net_ms']:.2f} | "
                  f"{m['client_ms']:.2f} | {m['busiest']:.0%} | "
                  f"{r['ceiling']:.1f} | {ratio:.0%} | {'yes' if ratio >= 0.7 else 'no'} |")


if __name__ == "__main__":
    main()
