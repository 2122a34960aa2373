"""Item codebooks shared through Redis: one version for every worker, one fitter at a time.

Each worker fits nothing on its own: it writes every item's fused content embedding to
a shared hash, and the worker holding the **lease** fits (or refreshes) the codebooks
on *all* items there and publishes them as a new **version**; every worker quantizes
with the current version, loaded from Redis, so code ids agree across workers and
survive restarts. Keys, per codebook configuration ``<cfg>`` (encoder, levels, sizes:
workers configured differently never mix codebooks), all under one hash tag so that
the publication script's keys share one Redis Cluster slot:

- ``{hw:codebook:<cfg>}:content`` — hash, item id → float32 content embedding;
- ``{hw:codebook:<cfg>}:current`` — hash, ``version`` and ``published`` (unix time);
- ``{hw:codebook:<cfg>}:v:<version>`` — the codebooks (``numpy.savez``, no pickle); the
  one a publication replaces expires an hour later (a worker may be loading it);
- ``{hw:codebook:<cfg>}:lease`` — the fitter's random token, with an expiry: a fitter
  that dies frees it by itself, and a publication is refused unless the lease is still
  the publisher's (a fitter whose lease ran out cannot overwrite a newer version);
- ``{hw:codebook:<cfg>}:pairs`` — list of the most recent QARM ``<trigger, target>`` pairs
  mined from clicks (``"trigger\ttarget"``, oldest first), capped: the alignment
  projection's training set (``HEADWATER_ALIGN_ONLINE``); ``...:pairs:total`` counts
  every pair ever mined (a refresh re-trains only when enough are new). The projection itself is part
  of each codebook version (``projection_weight``/``projection_bias``), so it has the
  version's lifetime and a restarted worker quantizes with the one that coded the items.

Item codes stay where rows and serving read them (``hw:codes:item:<id>``, written in
the online store's format); a write carries its codebook generation and never replaces
codes of a newer generation, so a worker that quantized with the previous version while
a refresh was being published cannot undo it.

>>> CodebookStore.config_name("hashing", 3, 64, 8)
'hashing-L3-K64-vq8'
"""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from core.redis_client import slot_chunks

__all__ = ["CodebookStore"]

#: KEYS: lease, current, new version key; ARGV: token, version, blob, now.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local old = redis.call('HGET', KEYS[2], 'version')
redis.call('SET', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'published', ARGV[4])
if old and old ~= ARGV[2] then
  redis.call('EXPIRE', string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[2]) .. old, 3600)
end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: KEYS: code hashes (of one cluster slot on a cluster); ARGV: generation, then
#: (codes JSON, version JSON) per key.
#: Writes a key unless it holds codes of a newer generation; returns how many written.
_WRITE_CODES = """
local gen = tonumber(ARGV[1])
local n = 0
for i, key in ipairs(KEYS) do
  local cur = redis.call('HGET', key, 'version')
  local cur_gen = cur and tonumber(string.match(cur, '^"?(%d+)%-'))
  if not cur_gen or cur_gen <= gen then
    redis.call('HSET', key, 'codes', ARGV[2 * i], 'version', ARGV[2 * i + 1])
    n = n + 1
  end
end
return n
"""


def _generation(version: str) -> int:
    """The codebook generation a version string starts with (``000003-ab12cd34.identity``)."""
    return int(version.split("-", 1)[0])


class CodebookStore:
    """The Redis side of shared codebooks (``redis.asyncio`` client injected)."""

    def __init__(self, client, config_name: str, lease_seconds: float,
                 codes_key: Callable[[Any], str], prefix: str = "hw") -> None:
        self.client = client
        self.base = self.key_base(config_name, prefix)
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.codes_key = codes_key
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._write = client.register_script(_WRITE_CODES)

    @staticmethod
    def key_base(config_name: str, prefix: str = "hw") -> str:
        """``{hw:codebook:<cfg>}``: every key of one codebook config (one cluster slot)."""
        return f"{{{prefix}:codebook:{config_name}}}"

    @staticmethod
    def config_name(encoder: str, levels: int, codebook_size: int, vq_k: int) -> str:
        return f"{encoder}-L{levels}-K{codebook_size}-vq{vq_k}"

    @property
    def content_key(self) -> str:
        return f"{self.base}:content"

    @property
    def current_key(self) -> str:
        return f"{self.base}:current"

    @property
    def lease_key(self) -> str:
        return f"{self.base}:lease"

    @property
    def pairs_key(self) -> str:
        return f"{self.base}:pairs"

    @property
    def pairs_total_key(self) -> str:
        return f"{self.base}:pairs:total"

    def version_key(self, version: str) -> str:
        return f"{self.base}:v:{version}"

    # -- content ----------------------------------------------------------------------
    async def put_content(self, ids: Sequence[Hashable], content: np.ndarray) -> None:
        if len(ids):
            vecs = np.asarray(content, dtype="<f4")
            await self.client.hset(self.content_key,
                                   mapping={str(i): vecs[r].tobytes() for r, i in enumerate(ids)})

    async def content_of(self, ids: Sequence[Hashable]) -> dict[str, np.ndarray]:
        """Stored content of these items (items without content are left out)."""
        if not len(ids):
            return {}
        raw = await self.client.hmget(self.content_key, [str(i) for i in ids])
        return {str(i): np.frombuffer(v, dtype="<f4") for i, v in zip(ids, raw, strict=True)
                if v is not None}

    async def content_count(self) -> int:
        return int(await self.client.hlen(self.content_key))

    async def all_content(self) -> tuple[list[str], np.ndarray]:
        """Every item's content, in item-id order (so every fitter sees the same matrix)."""
        raw = await self.client.hgetall(self.content_key)
        ids = sorted(k.decode() for k in raw)
        if not ids:
            return [], np.zeros((0, 0), np.float32)
        return ids, np.stack([np.frombuffer(raw[i.encode()], dtype="<f4") for i in ids])

    # -- alignment pairs ----------------------------------------------------------------
    async def push_pairs(self, pairs: Sequence[tuple[Hashable, Hashable]], keep: int) -> None:
        """Append mined ``(trigger, target)`` pairs; only the newest ``keep`` stay."""
        if pairs:
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(self.pairs_key, *[f"{a}\t{b}" for a, b in pairs])
            pipe.ltrim(self.pairs_key, -keep, -1)
            pipe.incrby(self.pairs_total_key, len(pairs))
            await pipe.execute()

    async def pairs_total(self) -> int:
        """Pairs mined in all (the list keeps only the newest)."""
        return int(await self.client.get(self.pairs_total_key) or 0)

    async def pairs(self) -> list[tuple[str, str]]:
        """Every stored pair, oldest first."""
        raw = await self.client.lrange(self.pairs_key, 0, -1)
        return [tuple(r.decode().split("\t", 1)) for r in raw]  # type: ignore[misc]

    # -- versions ---------------------------------------------------------------------
    async def current(self) -> tuple[str | None, float]:
        """The current version and when it was published (``None``, 0 before a first fit)."""
        raw = await self.client.hgetall(self.current_key)
        if b"version" not in raw:
            return None, 0.0
        return raw[b"version"].decode(), float(raw.get(b"published", b"0"))

    async def load(self, version: str) -> dict[str, np.ndarray]:
        blob = await self.client.get(self.version_key(version))
        if blob is None:
            raise LookupError(f"codebook version {version} is not in Redis (replaced meanwhile?)")
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    async def acquire(self) -> str | None:
        """The lease's token if this caller now holds it, else ``None`` (another fits)."""
        token = secrets.token_hex(8)
        ok = await self.client.set(self.lease_key, token, nx=True, px=self.lease_ms)
        return token if ok else None

    async def release(self, token: str) -> None:
        await self._release(keys=[self.lease_key], args=[token])

    async def publish(self, token: str, version: str, arrays: Mapping[str, np.ndarray]) -> bool:
        """Make ``version`` current, if ``token`` still holds the lease."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        ok = await self._publish(keys=[self.lease_key, self.current_key, self.version_key(version)],
                                 args=[token, version, buf.getvalue(), repr(time.time())])
        return bool(int(ok))

    # -- item codes -------------------------------------------------------------------
    async def write_codes(self, codes: Mapping[Hashable, Mapping[str, Any]], version: str,
                          chunk: int = 500) -> int:
        """Store item codes of ``version`` unless an item holds a newer generation's."""
        written = 0
        items = list(codes.items())
        for part in slot_chunks(self.client, items, lambda item: self.codes_key(item[0]), chunk):
            args: list = [_generation(version)]
            for _, c in part:
                clean = {"rq": [int(v) for v in c["rq"]], "vq": [int(v) for v in c["vq"]]}
                args += [json.dumps(clean), json.dumps(str(version))]
            written += int(await self._write(keys=[self.codes_key(i) for i, _ in part], args=args))
        return written
