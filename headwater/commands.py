"""Implementations of the ``headwater`` commands; :mod:`headwater.cli` parses and dispatches."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable

from core.net import redact_url
from core.settings import Settings, settings_table
from headwater.servers import StackError
from headwater.stack import SERVICES, down, resolve_addresses, up

#: Command name -> implementation; filled by :func:`command`.
COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {}


def command(name: str):
    """Register the decorated function as the implementation of ``headwater NAME``."""
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str, sort_keys=True))


@command("up")
def cmd_up(args, settings: Settings) -> int:
    services = tuple(s for s in (args.only.split(",") if args.only else SERVICES) if s)
    state = up(settings, services)
    print(f"broker    {state.kafka}{'  (embedded Tansu)' if 'broker' in state.embedded else ''}")
    print(f"redis     {redact_url(state.redis)}{'  (embedded)' if 'redis' in state.embedded else ''}")
    print(f"serving   {state.http}   (dashboard: {state.http}/)")
    print(f"worker    http://{settings.bind_host}:{settings.worker_port}/metrics")
    print(f"learner   http://{settings.bind_host}:{settings.learner_port}/metrics")
    print(f"logs      {settings.log_dir}/")
    return 0


@command("down")
def cmd_down(args, settings: Settings) -> int:
    down(settings, purge=args.purge)
    return 0


@command("reset")
def cmd_reset(args, settings: Settings) -> int:
    down(settings, purge=True)
    return 0


@command("settings")
def cmd_settings(args, settings: Settings) -> int:
    for name, env, default, doc in settings_table():
        print(f"{name:24s} {env:34s} {default:20s} {doc}")
    return 0


def collect_status(settings: Settings) -> dict:
    """Everything ``headwater status`` shows, as one JSON-able document."""
    from core.health import read_all_sync
    from core.net import port_open
    from core.redis_client import connect

    kafka, redis_url = resolve_addresses(settings)
    host, _, port = kafka.split(",")[0].rpartition(":")
    doc: dict = {"kafka": {"address": kafka, "reachable": port_open(host, int(port))},
                 "redis": {"address": redact_url(redis_url)}, "services": {}}
    try:
        client = connect(redis_url, socket_timeout=2)
        client.ping()
        doc["redis"]["reachable"] = True
        services = read_all_sync(client)
        client.close()
    except Exception as exc:  # noqa: BLE001 - status reports, never raises
        doc["redis"]["reachable"] = False
        doc["redis"]["error"] = str(exc)
        services = []
    for s in services:
        doc["services"].setdefault(s["service"], []).append(s)
    doc["healthy"] = is_healthy(doc)
    return doc


SERVICE_NAMES = ("worker", "learner", "serving")


def is_healthy(doc: dict) -> bool:
    """Broker and Redis reachable, and every service has a healthy heartbeat.

    >>> up = {"healthy": True}
    >>> is_healthy({"kafka": {"reachable": True}, "redis": {"reachable": True},
    ...             "services": {"worker": [up], "learner": [up], "serving": [up]}})
    True
    >>> is_healthy({"kafka": {"reachable": True}, "redis": {"reachable": True},
    ...             "services": {"worker": [up], "serving": [up]}})
    False
    """
    if not (doc["kafka"]["reachable"] and doc["redis"].get("reachable")):
        return False
    return all(doc["services"].get(name) and all(s.get("healthy") for s in doc["services"][name])
               for name in SERVICE_NAMES)


def _fmt_service(s: dict) -> str:
    keys = [k for k in ("events_in_total", "events_valid_total", "dead_letter_total", "rows_out_total",
                        "alerts_total", "model_version", "rows_trained", "served_auc", "prequential_auc",
                        "requests_total", "placeholder", "join") if s.get(k) is not None]
    extra = "  ".join(f"{k}={s[k]}" for k in keys)
    err = f"  last_error={s['last_error']!r}" if s.get("last_error") else ""
    return f"{'healthy' if s.get('healthy') else 'UNHEALTHY':9s} pid={s.get('pid')} up={s.get('uptime_s')}s  {extra}{err}"


@command("status")
def cmd_status(args, settings: Settings) -> int:
    doc = collect_status(settings)
    code = 0 if doc["healthy"] else 1  # scripts can gate on `headwater status`
    if args.json:
        print_json(doc)
        return code
    print(f"broker   {doc['kafka']['address']}  {'reachable' if doc['kafka']['reachable'] else 'UNREACHABLE'}")
    print(f"redis    {doc['redis']['address']}  {'reachable' if doc['redis'].get('reachable') else 'UNREACHABLE'}")
    for name in SERVICE_NAMES:
        instances = doc["services"].get(name, [])
        if not instances:
            print(f"{name:8s} DOWN (no heartbeat)")
        for s in instances:
            print(f"{name:8s} {_fmt_service(s)}")
    return code


@command("worker")
def cmd_worker(args, settings: Settings) -> int:
    from streams.worker import run_worker

    kafka, redis_url = resolve_addresses(settings)
    return run_worker(settings, kafka, redis_url)


@command("learner")
def cmd_learner(args, settings: Settings) -> int:
    from streams.learner_runner import run_learner

    procs = args.procs or settings.learner_procs
    if procs > 1 and settings.learner_world_size == 1:
        from learner.distributed import supervise
        from streams.learner_runner import exit_now

        exit_now(supervise(procs, env=settings_env(settings)))
    kafka, redis_url = resolve_addresses(settings)
    return run_learner(settings, kafka, redis_url)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment plus every setting as ``HEADWATER_<NAME>``, so child processes see
    the ``--set`` overrides too.

    >>> settings_env(Settings(http_port=9001))["HEADWATER_HTTP_PORT"]
    '9001'
    """
    import os

    from pydantic import SecretStr

    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"HEADWATER_{name.upper()}"] = str(value)
    return env


@command("serve")
def cmd_serve(args, settings: Settings) -> int:
    from serving.app import run_serving

    kafka, redis_url = resolve_addresses(settings)
    return run_serving(settings, kafka, redis_url)


def join_warning(workers: list[dict]) -> str | None:
    """Why impressions replayed now would not become training rows, or None.

    The joiner is opt-in (``HEADWATER_JOIN=1``, docs/contracts.md); without a worker
    running it, impressions and actions are logged and nobody joins them.

    >>> join_warning([{"join": True}, {"join": False}]) is None
    True
    >>> join_warning([{"join": False}])[:40]
    'no running worker has the joiner on (HEA'
    >>> join_warning([])[:23]
    'no worker is running: t'
    """
    if not workers:
        return ("no worker is running: the impressions and actions wait on the broker until a "
                "worker with HEADWATER_JOIN=1 joins them")
    if not any(w.get("join") for w in workers):
        return ("no running worker has the joiner on (HEADWATER_JOIN=1): impressions and actions "
                "are logged but not joined into training rows; restart the stack with "
                "HEADWATER_JOIN=1 (docs/contracts.md)")
    return None


@command("replay")
def cmd_replay(args, settings: Settings) -> int:
    from streams.replay import replay_movielens

    if args.path is not None and not args.path.is_dir():
        raise StackError(f"replay: no such directory {args.path}")
    kafka, redis_url = resolve_addresses(settings)
    _require_broker(kafka)
    if getattr(args, "as_", "clicks") == "impressions":
        from headwater.impression_replay import replay_impressions

        http = args.serving or f"http://{settings.bind_host}:{settings.http_port}"
        warning = join_warning(collect_status(settings)["services"].get("worker", []))
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        stats = replay_impressions(settings, kafka, redis_url, args.path, limit=args.limit,
                                   progress=not args.no_progress, wait_items=args.wait_items,
                                   http=http)
        print(f"replayed {stats['items']} items and {stats['impressions']} impressions "
              f"({stats['mode']}) with {stats['clicks']} clicks in {stats['seconds']:.1f}s "
              f"({stats['impressions_per_s']:.0f} impressions/s)")
        return 0
    stats = replay_movielens(settings, kafka, args.path, rate=args.rate, limit=args.limit,
                             batch=args.batch, progress=not args.no_progress,
                             redis_url=redis_url, wait_items=args.wait_items, live=args.live)
    coded = "" if stats["items_coded"] is None else f" ({stats['items_coded']} coded)"
    print(f"replayed {stats['items']} items{coded} and {stats['clicks']} click events "
          f"in {stats['seconds']:.1f}s (clicks: {stats['click_seconds']:.1f}s, "
          f"{stats['clicks_per_s']:.0f} events/s)")
    return 0


@command("produce")
def cmd_produce(args, settings: Settings) -> int:
    from streams.producer import make_producer

    if not args.file.is_file():  # before connecting: a typo must not wait for the broker
        raise StackError(f"produce: no such file {args.file}")
    data = args.file.read_bytes()
    kafka, _ = resolve_addresses(settings)
    _require_broker(kafka)
    topic = settings.topics[args.kind]
    producer = make_producer(kafka)
    n = 0
    if args.kind == "audit":
        host = (args.host or socket.gethostname()).encode()
        lines = data.splitlines(keepends=True)
        for i in range(0, len(lines), 500):
            producer.send(topic, key=host, value=b"".join(lines[i:i + 500]))
            n += 1
    else:
        text = data.strip()
        if text.startswith(b"["):
            producer.send(topic, value=text)
            n = 1
        else:
            for line in text.splitlines():
                if line.strip():
                    producer.send(topic, value=line.strip())
                    n += 1
    producer.flush()
    producer.close()
    print(f"produced {n} messages to {topic}")
    return 0


def _require_broker(kafka: str) -> None:
    """A one-line error now, instead of the Kafka client's retries and a traceback later."""
    from core.net import port_open

    for address in kafka.split(","):
        host, _, port = address.strip().rpartition(":")
        if port.isdigit() and port_open(host or "127.0.0.1", int(port), timeout=2.0):
            return
    raise StackError(f"no broker reachable at {kafka}: is the stack up (`headwater up`)?")


@command("ship-audit")
def cmd_ship_audit(args, settings: Settings) -> int:
    from streams.audit_shipper import ship_audit

    kafka, _ = resolve_addresses(settings)
    host = args.host or socket.gethostname()
    state = args.state or settings.state_dir / "ship-audit" / f"{host}.pos"
    n = ship_audit(settings, kafka, args.path, host, state, follow=args.follow)
    print(f"shipped {n} audit lines from {args.path} as host {host}")
    return 0


@command("features")
def cmd_features(args, settings: Settings) -> int:
    from features.defaults import definition, row_builder
    from features.store import SyncOnlineStore

    if args.action == "list":
        doc = definition(settings).describe()
        schema = row_builder(settings).schema
        doc["schema"] = {"categorical": schema.categorical, "dense": schema.dense, "hash": schema.hash}
        if args.json:
            print_json(doc)
            return 0
        print(f"feature definition {doc['name']} v{doc['version']}  ({doc['source']})")
        for where, names in doc["attributes"].items():
            print(f"  {where + ' attributes':20s} {', '.join(names) or '-'}")
        print(f"  {'counters':20s} half-lives {', '.join(doc['half_lives'])}; smoothing "
              f"prior {doc['smoothing']['prior']}, alpha {doc['smoothing']['alpha']}")
        for name, key in doc["counters"].items():
            bucket = "  (+ buckets)" if name in doc["bucketized"] else ""
            print(f"    {name:18s} key {', '.join(key) or '(global)'}{bucket}")
        print(f"  model: {len(schema.categorical)} categorical fields, {len(schema.dense)} dense; "
              f"schema {schema.hash[:12]}")
        print(f"    categorical: {', '.join(schema.categorical)}")
        print(f"    dense:       {', '.join(schema.dense)}")
        return 0
    if not args.entity:
        raise StackError("features get needs an entity: user:ID or item:ID")

    _, redis_url = resolve_addresses(settings)
    if ":" not in args.entity or args.entity.split(":", 1)[0] not in ("user", "item"):
        raise StackError(f"entity must be user:ID or item:ID, got {args.entity!r}")
    import redis

    store = SyncOnlineStore.from_url(redis_url, partitions=settings.partitions,
                                     counters=definition(settings).counters)
    try:
        doc = store.entity_features(args.entity)
    except redis.exceptions.ConnectionError as exc:
        raise StackError(f"Redis at {redact_url(redis_url)} unreachable: {exc}") from exc
    finally:
        store.close()
    if args.json:
        print_json(doc)
    else:
        for k, v in doc.items():
            print(f"{k:32s} {v}")
    return 0


@command("lag")
def cmd_lag(args, settings: Settings) -> int:
    from serving.lag import LagMonitor, format_lag_table

    kafka, _ = resolve_addresses(settings)
    _require_broker(kafka)
    monitor = LagMonitor(kafka)
    try:
        while True:
            report = monitor.sample()
            if args.json:
                print(json.dumps(report, default=str))
            else:
                if args.watch:
                    sys.stdout.write("\x1b[2J\x1b[H")
                print(format_lag_table(report))
            sys.stdout.flush()
            if not args.watch:
                return 0
            time.sleep(args.interval)
    finally:
        monitor.close()


@command("models")
def cmd_models(args, settings: Settings) -> int:
    import urllib.error
    import urllib.request

    base = f"http://{settings.bind_host}:{settings.http_port}"
    headers = {"Content-Type": "application/json"}
    token = settings.admin_token_value()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if args.action == "list":
        req = urllib.request.Request(f"{base}/v1/models")
    elif args.action == "pin":
        if not args.version:
            raise StackError("models pin needs a VERSION")
        req = urllib.request.Request(f"{base}/v1/models/{args.version}/pin", data=b"{}",
                                     headers=headers, method="POST")
    elif args.action == "unpin":
        req = urllib.request.Request(f"{base}/v1/models/unpin", data=b"{}", headers=headers,
                                     method="POST")
    else:
        req = urllib.request.Request(f"{base}/v1/models/rollback", data=b"{}", headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise StackError(f"serving answered {exc.code}: {exc.read().decode(errors='replace')}") from exc
    except urllib.error.URLError as exc:
        raise StackError(f"serving at {base} unreachable: {exc.reason}") from exc
    if args.json or args.action != "list":
        print_json(body)
    else:
        for m in body.get("models", []):
            print(f"{m['version']:>8s}  {m['state']:10s} {'pinned' if m.get('pinned') else '':6s} "
                  f"{'SERVING' if m.get('serving') else '':7s} {m.get('error') or ''}")
    return 0
