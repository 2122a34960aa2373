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

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["aidentity", "amget", "cluster_seeds", "connect", "connect_async", "hiredis_packing",
           "identity", "is_cluster", "is_cluster_url", "mget", "slot_chunks"]

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
