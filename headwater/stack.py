"""The embedded stack: broker, Redis, worker, learner and serving as real child processes.

``headwater up`` starts them detached (each in its own session, logs under
``<state_dir>/logs``), records what it started in ``<state_dir>/run/stack.json`` and
returns once every service reports healthy. ``headwater down`` stops exactly what that
file names. A leftover file whose processes are gone is reported and replaced; one
whose processes still run is refused, never silently reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.settings import Settings, is_object_store
from headwater.lifetimes import mismatches, refusal
from headwater.lifetimes import purge as lifetimes_purge
from headwater.servers import (
    StackError,
    pid_alive,
    port_open,
    start_broker,
    start_redis,
    stop_pid,
    wait_for_port,
)

SERVICES = ("worker", "learner", "serve")
#: process (command) name -> the service name its heartbeat uses
SERVICE_NAMES = {"worker": "worker", "learner": "learner", "serve": "serving"}


@dataclass
class StackState:
    kafka: str
    redis: str
    http: str
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    embedded: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None


def state_path(settings: Settings) -> Path:
    return settings.run_dir / "stack.json"


def resolve_addresses(settings: Settings) -> tuple[str, str]:
    """(kafka bootstrap, redis url): settings first, else the running embedded stack."""
    state = StackState.load(state_path(settings))
    kafka = settings.kafka or (state.kafka if state else None)
    redis_url = settings.redis or (state.redis if state else None)
    if not kafka or not redis_url:
        raise StackError(
            "no broker/Redis known: run `headwater up` first, or set HEADWATER_KAFKA and HEADWATER_REDIS"
        )
    return kafka, redis_url


def check_stale(settings: Settings) -> str | None:
    """Refuse a live previous stack; report (and clear) a dead one. Returns a notice."""
    path = state_path(settings)
    state = StackState.load(path)
    if state is None:
        return None
    alive = {name: pid for name, pid in state.pids.items() if pid_alive(pid)}
    if alive:
        listing = ", ".join(f"{n}={p}" for n, p in alive.items())
        raise StackError(f"a stack from {path} is still running ({listing}); run `headwater down` first")
    path.unlink()
    return f"removed stale {path}: its processes ({', '.join(state.pids)}) are gone"


def _service_env(settings: Settings, kafka: str, redis_url: str) -> dict[str, str]:
    """The services' environment: this one, every setting given explicitly to ``settings``
    (a programmatic caller's too, not only ``HEADWATER_*`` variables), the addresses."""
    env = dict(os.environ)
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        key = f"HEADWATER_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)
    env["HEADWATER_KAFKA"] = kafka
    env["HEADWATER_REDIS"] = redis_url
    env["HEADWATER_STATE_DIR"] = str(settings.state_dir.resolve())
    env["HEADWATER_MODEL_STORE"] = (settings.model_store if is_object_store(settings.model_store)
                                    else str(settings.model_store.resolve()))
    env["HEADWATER_HTTP_PORT"] = str(settings.http_port)
    env["HEADWATER_WORKER_PORT"] = str(settings.worker_port)
    env["HEADWATER_LEARNER_PORT"] = str(settings.learner_port)
    env["HEADWATER_TOPIC_PREFIX"] = settings.topic_prefix
    env["HEADWATER_PARTITIONS"] = str(settings.partitions)
    env["HEADWATER_SERVE_WORKERS"] = str(settings.serve_workers)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def spawn_service(name: str, settings: Settings, kafka: str, redis_url: str,
                  copy: int = 0) -> subprocess.Popen:
    """Start ``python -m headwater <name>`` detached, logging to ``logs/<label>.log``
    (:func:`service_label`); worker copy ``i`` serves ``/metrics`` on ``worker_port + i``."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    env = _service_env(settings, kafka, redis_url)
    if copy and settings.worker_port:
        env["HEADWATER_WORKER_PORT"] = str(settings.worker_port + copy)
    log = open(settings.log_dir / f"{service_label(name, copy)}.log", "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "headwater", name],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
    finally:
        log.close()


def service_label(name: str, copy: int = 0) -> str:
    """A started process's name in the stack's state file and its log's name: ``worker``,
    ``worker-2``, …

    >>> service_label("worker"), service_label("worker", 1)
    ('worker', 'worker-2')
    """
    return name if copy == 0 else f"{name}-{copy + 1}"


def copies(settings: Settings, name: str) -> int:
    """How many processes ``up`` starts for service ``name`` (``worker_procs`` workers)."""
    return settings.worker_procs if name == "worker" else 1


def wait_healthy(redis_url: str, services: list[str], timeout: float) -> dict[str, dict]:
    """Wait until each named service has published a status document (a name listed
    ``k`` times: ``k`` instances of it)."""
    from core.health import read_all_sync
    from core.redis_client import connect

    want = Counter(services)
    client = connect(redis_url)
    deadline = time.monotonic() + timeout
    docs: list[dict] = []
    try:
        while time.monotonic() < deadline:
            docs = read_all_sync(client)
            have = Counter(d["service"] for d in docs)
            if all(have[s] >= k for s, k in want.items()):
                return {d["service"]: d for d in docs}
            time.sleep(0.2)
    finally:
        client.close()
    have = Counter(d["service"] for d in docs)
    missing = [f"{s} ({have[s]} of {k})" if k > 1 else s for s, k in want.items() if have[s] < k]
    raise StackError(f"services {missing} did not report healthy within {timeout:.0f}s; see the logs")


def up(settings: Settings, services: tuple[str, ...] = SERVICES, timeout: float = 90.0,
       echo=print) -> StackState:
    """Start the stack and return its state once every service reports healthy."""
    notice = check_stale(settings)
    if notice:
        echo(f"note: {notice}")
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    if "worker" in services and settings.worker_port and settings.worker_procs > 1:
        used = range(settings.worker_port, settings.worker_port + settings.worker_procs)
        clash = sorted({settings.http_port, settings.learner_port} & set(used))
        if clash:
            raise StackError(f"worker_procs={settings.worker_procs} workers on ports {used.start}–"
                             f"{used.stop - 1} would take port {clash[0]}: move HEADWATER_WORKER_PORT")
    if port_open(settings.bind_host, settings.http_port) and "serve" in services:
        raise StackError(f"port {settings.http_port} is in use: set HEADWATER_HTTP_PORT or stop its owner")
    t0 = time.monotonic()
    state = StackState(kafka="", redis="", http=f"http://{settings.bind_host}:{settings.http_port}",
                       started_at=time.time())
    started = []
    try:
        if settings.kafka:
            state.kafka = settings.kafka
        else:
            broker = start_broker(settings.bind_host, settings.kafka_port,
                                  log_path=settings.log_dir / "broker.log")
            started.append(broker.pid)
            state.pids["broker"] = broker.pid
            state.embedded.append("broker")
            state.kafka = f"{broker.host}:{broker.port}"
        if settings.redis:
            state.redis = settings.redis
        else:
            redis_server = start_redis(settings.bind_host, settings.redis_port,
                                       data_dir=settings.state_dir / "redis",
                                       appendfsync=settings.redis_appendfsync,
                                       log_path=settings.log_dir / "redis.log")
            started.append(redis_server.pid)
            state.pids["redis"] = redis_server.pid
            state.embedded.append("redis")
            state.redis = redis_server.extra["url"]
        state.save(state_path(settings))

        from streams.topics import ensure_topics

        ensure_topics(settings, state.kafka)
        lines = mismatches(settings, state.kafka, state.redis)
        if lines:
            raise StackError(refusal(settings, lines, "broker" in state.embedded))
        for name in services:
            for copy in range(copies(settings, name)):
                proc = spawn_service(name, settings, state.kafka, state.redis, copy)
                started.append(proc.pid)
                state.pids[service_label(name, copy)] = proc.pid
        state.save(state_path(settings))
        wait_healthy(state.redis, [SERVICE_NAMES[s] for s in services for _ in range(copies(settings, s))],
                     timeout)
        if "serve" in services:
            wait_for_port(settings.bind_host, settings.http_port, timeout)
    except BaseException:
        for pid in reversed(started):
            stop_pid(pid)
        state_path(settings).unlink(missing_ok=True)
        raise
    echo(f"headwater up in {time.monotonic() - t0:.1f}s")
    return state


def down(settings: Settings, echo=print, purge: bool = False) -> bool:
    """Stop what ``up`` started (services first, then Redis and the broker).

    Everything kept on disk (Redis's AOF, the model store) stays for the next ``up``;
    with ``purge`` it is wiped too (``headwater reset``, :mod:`headwater.lifetimes`).
    """
    path = state_path(settings)
    state = StackState.load(path)
    if state is None:
        echo("nothing to stop: no stack.json")
        if purge:
            lifetimes_purge(settings, echo)
        return False
    order = [*SERVICES, "redis", "broker"]
    for name in sorted(state.pids, key=lambda n: order.index(n) if n in order else -1):
        pid = state.pids[name]
        stopped = stop_pid(pid, timeout=10.0)
        echo(f"{name:8s} pid {pid}: {'stopped' if stopped else 'was not running'}")
    path.unlink(missing_ok=True)
    if purge:
        lifetimes_purge(settings, echo)
    return True
