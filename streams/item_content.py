"""Item content for EM3 fields, read from the codebooks' shared content hash in Redis.

The items agent stores every item's fused content embedding in
``hw:codebook:<cfg>:content`` (``features.codebook_store``). The learner and serving read
it into a ``learner.em3.ItemContentTable`` keyed by the ``item_id`` field's token (rows
carry tokens), reloading when a row names an item the table does not know yet.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.settings import Settings
from features.codebook_store import CodebookStore
from features.hashing import hash_tokens
from learner.em3 import ItemContentTable

__all__ = ["content_dims", "content_key", "em3_spec", "item_content_table"]


def content_dims(settings: Settings) -> tuple[int, int]:
    """``(content dim, text dim)`` of the configured encoder's fused content."""
    from streams.item_path import make_encoder

    enc = make_encoder(settings.content_encoder)
    return enc.dim, enc.text_encoder.dim


def em3_spec(settings: Settings) -> dict[str, Any]:
    """The ranker spec's ``em3`` entry for these settings (empty: EM3 off)."""
    if not settings.em3_queries:
        return {}
    content_dim, text_dim = content_dims(settings)
    return {"n_queries": settings.em3_queries, "content_dim": content_dim, "text_dim": text_dim,
            "cid_weight": settings.em3_cid_weight,
            "cid_temperature": settings.em3_cid_temperature,
            **({"seq_lora_rank": settings.em3_seq_lora_rank} if settings.em3_seq_lora_rank else {})}


def content_key(settings: Settings) -> str:
    """The Redis hash holding every item's fused content for these settings' codebooks."""
    name = CodebookStore.config_name(settings.content_encoder, settings.code_levels,
                                     settings.codebook_size, settings.vq_k)
    return f"{CodebookStore.key_base(name)}:content"


def item_content_table(settings: Settings, redis_url: str) -> ItemContentTable:
    """A table that (re)loads every item's content from Redis when it meets a new item."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    key = content_key(settings)
    content_dim, _ = content_dims(settings)

    def load() -> tuple[np.ndarray, np.ndarray]:
        raw = client.hgetall(key)
        if not raw:
            return np.zeros(0, np.int64), np.zeros((0, content_dim), np.float32)
        ids = [k.decode() for k in raw]
        content = np.stack([np.frombuffer(raw[k], dtype="<f4") for k in raw])
        return hash_tokens("item_id", ids), content

    table = ItemContentTable(content_dim, load)
    table.reload()
    return table
