"""Redis clients from a URL: one server, or a Redis Cluster when the URL says so.

Every process that talks to Redis (worker, learner, serving, CLI) builds its client
here, so one setting, ``HEADWATER_REDIS``, decides for all of them:

- ``redis://host:port/0``, ``rediss://…``, ``unix://…``: one server (``redis.Redis``);
- ``redis+cluster://host:port[,host:port…]``, ``rediss+cluster://…``: a Redis Cluster
  (redis-py's ``RedisCluster``). The listed nodes are only seeds; the client learns the
  slot map from any one that answers and follows failovers by itself, so list more than
  one (a seed that is down at start is skipped). User, password and query options are
  those of ``redis://``; the database must be 0.

The helpers below cover the few places where a cluster client must be used
differently: ``MGET`` over keys of many slots, and "which servers am I talking to"
(a restart or failover shows as a new identity).

>>> is_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
True
>>> is_cluster_url("redis://127.0.0.1:6379/0")
False
>>> cluster_seeds("rediss+cluster://app:pw@a:7000,b:7001/0?ssl_ca_certs=/ca.pem")
('rediss://app:pw@a:7000/0?ssl_ca_certs=/ca.pem', [('b', 7001)])
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.redis_tracking import Invalidations

__all__ = ["RoundTrips", "aidentity", "amget", "cluster_seeds", "connect", "connect_async", "hiredis_packing",
           "identity", "is_cluster", "is_cluster_url", "mget", "slot_chunks"]

#: hiredis's type of a RESP3 push (``tracking-redir-broken``...), never a command's reply
_PUSH = hiredis.PushNotification

#: URL scheme of a cluster -> the scheme of one of its nodes
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """True when ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as (the first node's ``redis://`` URL, the other seeds' (host, port))."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://host:port,...): {url!r}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise ValueError(f"Redis Cluster URL names no node: {url!r}")
    others = []
    for node in nodes[1:]:
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Redis Cluster URL: expected host:port, got {node!r}")
        others.append((host.strip("[]"), int(port)))
    first = urlunsplit(parts._replace(scheme=scheme, netloc=f"{userinfo}{at}{nodes[0]}"))
    return first, others


#: A cluster client's socket timeouts unless the caller gives its own: a seed or node
#: that died may have its port taken by another process that accepts and never answers.
CLUSTER_TIMEOUTS = {"socket_connect_timeout": 2.0, "socket_timeout": 10.0}


def connect(url: str, **kwargs: Any):
    """A blocking client for ``url``: ``redis.Redis``, or ``redis.RedisCluster``."""
    import redis

    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    kwargs = {**CLUSTER_TIMEOUTS, **kwargs}
    first, others = cluster_seeds(url)
    return RedisCluster.from_url(first, startup_nodes=[ClusterNode(h, p) for h, p in others],
                                 **kwargs)


_PACKING: dict[type, type] = {}


def hiredis_packing(connection_class: type) -> type:
    """``connection_class`` (a ``redis.asyncio`` connection) packing commands with hiredis.

    redis-py's blocking client packs commands with ``hiredis.pack_command`` (C) when
    hiredis is installed; its asyncio connection always packs in Python, argument by
    argument, re-joining the buffer each time. For the store's scripts, which take a key
    per entity, that was the worker's largest single cost (~1.7 ms for a 400-key command;
    hiredis: ~0.1 ms). The bytes sent are the same; arguments hiredis does not take
    (``memoryview``, or a client with another encoding than strict UTF-8) go the Python way,
    as does every error (so redis-py's ``DataError`` for a bad argument is unchanged).

    >>> from redis.asyncio.connection import Connection
    >>> fast = hiredis_packing(Connection)()
    >>> fast.pack_command("CONFIG GET", "maxmemory") == Connection().pack_command(
    ...     "CONFIG GET", "maxmemory")
    True
    """
    try:
        import hiredis
    except ImportError:  # pragma: no cover - hiredis is a dependency
        return connection_class
    if connection_class in _PACKING:
        return _PACKING[connection_class]

    class HiredisPacking(connection_class):  # type: ignore[misc, valid-type]
        def pack_command(self, *args: Any) -> list[bytes]:
            enc = self.encoder
            if enc.encoding.lower().replace("-", "") == "utf8" and enc.encoding_errors == "strict":
                head = args[0]
                if isinstance(head, str):
                    parts = tuple(head.encode().split()) + args[1:]
                elif isinstance(head, bytes) and b" " in head:
                    parts = tuple(head.split()) + args[1:]
                else:
                    parts = args
                try:
                    return [hiredis.pack_command(parts)]
                except TypeError:
                    pass  # memoryview or a bad argument: redis-py's own packing and error
            return super().pack_command(*args)

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = f"HiredisPacking{connection_class.__name__}"
    _PACKING[connection_class] = HiredisPacking
    return HiredisPacking


def connect_async(url: str, **kwargs: Any):
    """An asyncio client for ``url``: ``redis.asyncio.Redis`` (packing commands with
    hiredis, :func:`hiredis_packing`), or its ``RedisCluster``."""
    import redis.asyncio

    if not is_cluster_url(url):
        client = redis.asyncio.Redis.from_url(url, **kwargs)
        pool = client.connection_pool
        pool.connection_class = hiredis_packing(pool.connection_class)
        return client
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    kwargs = {**CLUSTER_TIMEOUTS, **kwargs}
    first, others = cluster_seeds(url)
    return RedisCluster.from_url(first, startup_nodes=[ClusterNode(h, p) for h, p in others],
                                 **kwargs)


def is_cluster(client: Any) -> bool:
    """True for a cluster client (sync or asyncio)."""
    return hasattr(client, "nodes_manager")


def mget(client: Any, keys: Sequence[Any]) -> list[Any]:
    """``MGET`` of keys that may live in different cluster slots (one server: plain ``MGET``)."""
    if not keys:
        return []
    return client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)


async def amget(client: Any, keys: Sequence[Any]) -> list[Any]:
    """:func:`mget` for an asyncio client."""
    if not keys:
        return []
    return await (client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys))


def _identity(info: Any, cluster: bool) -> Any:
    if not cluster:
        return info["run_id"]
    return tuple(sorted((str(node), doc["run_id"]) for node, doc in info.items()))


def identity(client: Any) -> Any:
    """Which servers answer: the ``run_id`` of one server, or of every cluster primary
    with its address. It changes when a server restarts or a replica is promoted."""
    if is_cluster(client):
        return _identity(client.info("server", target_nodes=client.PRIMARIES), True)
    return _identity(client.info("server"), False)


async def aidentity(client: Any) -> Any:
    """:func:`identity` for an asyncio client."""
    if is_cluster(client):
        return _identity(await client.info("server", target_nodes=client.PRIMARIES), True)
    return _identity(await client.info("server"), False)


def slot_chunks(client: Any, items: Sequence[Any], key: Any, size: int) -> list[list[Any]]:
    """``items`` in chunks of at most ``size`` whose keys (``key(item)``) share one cluster
    slot, so that one script may touch them all; one server: plain chunks, in order.

    >>> slot_chunks(object(), [1, 2, 3], str, 2)
    [[1, 2], [3]]
    """
    if not is_cluster(client):
        return [list(items[i:i + size]) for i in range(0, len(items), size)]
    from redis.crc import key_slot

    by_slot: dict[int, list[Any]] = {}
    for item in items:
        by_slot.setdefault(key_slot(str(key(item)).encode()), []).append(item)
    return [group[i:i + size] for group in by_slot.values() for i in range(0, len(group), size)]


class RoundTrips:
    """Round trips of raw commands over a few plain connections to one Redis server,
    parsed by hiredis: what a store's read plan needs from a pipeline and nothing else.

    redis-py's asyncio pipeline pays, per round trip, a pool lock, a connect and
    ``can_read`` health check of the pooled connection, a retry wrapper and its
    observability hooks: ~470–520 µs of client CPU for a two-command read where writing
    the packed commands and parsing the replies with hiredis costs ~170–250 µs (session
    14, docs/decisions.md "Serving's feature reads on their own connections"). Serving
    spends one such round trip per request.

    :meth:`execute` answers like ``pipeline(transaction=False).execute(raise_on_error=False)``:
    one reply per command, an error reply as its redis-py exception (``NoScriptError``,
    ``ResponseError``...) in its place; except the replies redis-py raises instead,
    its ``ConnectionError`` kinds (``LOADING`` while Redis reads its AOF after a
    restart: ``BusyLoadingError``), which are raised here too. A broken connection raises redis-py's
    ``ConnectionError`` (no answer within ``timeout``: ``TimeoutError``) and is dropped;
    callers retry those, as with redis-py. A connection is reused only after a complete
    answer, so a cancelled request never leaves half a reply for the next one. Only ``redis://`` and ``unix://`` servers
    (TLS and clusters keep redis-py's pipeline: :meth:`for_url` returns None).
    """

    def __init__(self, host: str | None = None, port: int = 6379, *, path: str | None = None,
                 db: int = 0, username: str | None = None, password: str | None = None,
                 connect_timeout: float = 5.0, timeout: float | None = 5.0, max_idle: int = 16,
                 callbacks: dict[str, Any] | None = None, tracking: bool = False) -> None:
        self.host, self.port, self.path = host, port, path
        #: redis-py's response callbacks by command name (``client.response_callbacks``):
        #: applied as its pipeline applies them (``HGETALL`` answers a dict, ...)
        self.callbacks = callbacks or {}
        self.db, self.username, self.password = db, username, password
        self.connect_timeout = connect_timeout
        #: seconds a round trip may wait for its answer (redis-py 8's socket timeout)
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[tuple[Any, Any, Any, int]] = []
        #: connections opened so far (the tests read it)
        self.opened = 0
        #: with ``tracking``, Redis tells :attr:`invalidations` which keys read over these
        #: connections changed (core/redis_tracking.py); caches subscribe to it
        self.invalidations = Invalidations(
            host, port, path=path, username=username, password=password,
            connect_timeout=connect_timeout) if tracking else None

    @classmethod
    def for_url(cls, url: str, callbacks: dict[str, Any] | None = None,
                tracking: bool = False) -> RoundTrips | None:
        """For a ``redis://`` or ``unix://`` URL; None for any other (TLS, cluster).

        >>> rt = RoundTrips.for_url("redis://:pw@10.0.0.5:6380/2")
        >>> (rt.host, rt.port, rt.db, rt.password)
        ('10.0.0.5', 6380, 2, 'pw')
        >>> RoundTrips.for_url("rediss://10.0.0.5:6380/0") is None
        True
        """
        from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

        if urlsplit(url).scheme.lower() not in ("redis", "unix"):
            return None
        kw = parse_url(url)
        if set(kw) - {"host", "port", "db", "username", "password", "path", "connection_class"}:
            return None  # options this client does not implement: keep redis-py's
        unix = kw.get("connection_class") is UnixDomainSocketConnection
        return cls(kw.get("host", "localhost") if not unix else None, int(kw.get("port", 6379)),
                   path=kw.get("path") if unix else None, db=int(kw.get("db", 0) or 0),
                   username=kw.get("username"), password=kw.get("password"), callbacks=callbacks,
                   tracking=tracking)

    async def _open(self) -> tuple[Any, Any, Any, int]:
        try:
            opening = (asyncio.open_unix_connection(self.path) if self.path
                       else asyncio.open_connection(self.host, self.port))
            reader, writer = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            where = self.path or f"{self.host}:{self.port}"
            raise RedisConnectionError(f"Error connecting to Redis at {where}: {exc!r}") from exc
        parser = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self.opened += 1
        # RESP3, as redis-py 8 speaks it: the same reply types (HGETALL a map, ...)
        hello: list[tuple[Any, ...]] = [
            ("HELLO", 3) if self.password is None
            else ("HELLO", 3, "AUTH", self.username or "default", self.password)]
        if self.db:
            hello.append(("SELECT", self.db))
        inv = self.invalidations
        generation = -1  # tracks for no listener
        if inv is not None and inv.live:
            generation = inv.generation
            hello.append(("CLIENT", "TRACKING", "ON", "REDIRECT", inv.client_id))
        replies = await self._round_trip((reader, writer, parser), hello)
        for reply in replies[:len(hello) - (generation >= 0)]:
            if isinstance(reply, Exception):
                writer.close()
                raise reply
        if generation >= 0 and isinstance(replies[-1], Exception):
            assert inv is not None
            if "redirect" in str(replies[-1]).lower():  # the listener's id is not this server's
                inv.redirect_failed()
            else:
                inv.refuse(str(replies[-1]))
            generation = -1
        return reader, writer, parser, generation

    async def execute(self, cmds: Sequence[tuple[Any, ...]]) -> list[Any]:
        conn = self._idle.pop() if self._idle else None
        inv = self.invalidations
        if inv is not None:
            inv.start()
            if conn is not None and conn[3] != (inv.generation if inv.live else -1):
                conn[1].close()  # tracks for a listener that is gone (or for none)
                conn = None
        if conn is None:
            conn = await self._open()
        out = await self._round_trip(conn, cmds)
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn[1].close()
        callbacks = self.callbacks
        for i, (cmd, reply) in enumerate(zip(cmds, out, strict=True)):
            # as redis-py's parser: a ConnectionError reply (alone or first of an array) is
            # raised, and callers retry it
            first = reply[0] if isinstance(reply, list) and reply else reply
            if isinstance(first, RedisConnectionError):
                raise first
            name = cmd[0].decode() if isinstance(cmd[0], bytes) else cmd[0]
            cb = callbacks.get(name.upper())
            if cb is not None and not isinstance(reply, Exception):
                out[i] = cb(reply)
        return out

    async def _round_trip(self, conn: tuple[Any, ...], cmds: Sequence[tuple[Any, ...]]) -> list[Any]:
        reader, writer, parser = conn[:3]
        out: list[Any] = []
        try:
            writer.write(b"".join([hiredis.pack_command(c) for c in cmds]))
            async with asyncio.timeout(self.timeout):
                while len(out) < len(cmds):
                    reply = parser.gets()
                    if reply is False:
                        data = await reader.read(65536)
                        if not data:
                            raise RedisConnectionError("Connection closed by server.")
                        parser.feed(data)
                        continue
                    if reply.__class__ is not _PUSH:  # RESP3 pushes: not replies
                        out.append(reply)
            return out
        except BaseException as exc:  # half an answer (or none): this connection is done
            writer.close()
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no answer from Redis in {self.timeout} s") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Error talking to Redis: {exc!r}") from exc
            raise

    def close(self) -> None:
        if self.invalidations is not None:
            self.invalidations.close()
        while self._idle:
            self._idle.pop()[1].close()
