"""core.redis_client: the asyncio client packs commands with hiredis, byte for byte as
redis-py does, and talks to a real Redis with it."""

from __future__ import annotations

import numpy as np
import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from core.redis_client import connect_async, hiredis_packing

ARGS = [
    ("SET", "k", "v"),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", "x"),
    ("EVALSHA", "ab" * 20, 3, "{hw:p1}:offsets", b"\x00\xff\r\n", 1.5, 0.1, 1e-17, 2**60, -3,
     float("inf"), "ünïcode", np.float64(0.1)),
    ("HSET", "k", 3.0, 1e300, 123456789.123456789, *[f"{{hw:p2}}:item:{i}" for i in range(3000)]),
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: str(a[0]))
def test_packs_the_same_bytes_as_redis_py(args):
    fast = hiredis_packing(Connection)()
    assert fast.pack_command is not Connection().pack_command
    assert b"".join(fast.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_what_hiredis_does_not_take_goes_redis_py_s_way():
    fast = hiredis_packing(Connection)()
    view = ("SET", "k", memoryview(b"value"))
    assert b"".join(fast.pack_command(*view)) == b"".join(Connection().pack_command(*view))
    for bad in (True, None, np.int64(3), [1]):
        with pytest.raises(DataError):
            fast.pack_command("SET", "k", bad)
    other = hiredis_packing(Connection)(encoding="latin-1")
    assert b"".join(other.pack_command("SET", "k", "é")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"


def test_keeps_the_url_s_connection_kind():
    assert issubclass(hiredis_packing(UnixDomainSocketConnection), UnixDomainSocketConnection)
    assert hiredis_packing(Connection) is hiredis_packing(Connection)  # one class per kind


async def test_async_client_round_trips_on_real_redis(redis_db):
    client = connect_async(redis_db)
    try:
        assert issubclass(client.connection_pool.connection_class, Connection)
        assert client.connection_pool.connection_class.__name__.startswith("HiredisPacking")
        keys = [f"{{t}}:k{i}" for i in range(500)]
        pipe = client.pipeline(transaction=False)
        pipe.mset({k: f"v{i}" for i, k in enumerate(keys)})
        pipe.eval("return #KEYS + #ARGV", len(keys), *keys, 1.5, b"\x00")
        pipe.get(keys[-1])
        _, n, last = await pipe.execute()
        assert (n, last) == (502, b"v499")
    finally:
        await client.aclose()
