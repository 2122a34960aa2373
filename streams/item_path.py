"""The items path of the worker: item content → attributes and quantized codes in Redis.

Codes are assigned the moment an item's content arrives (cold start): encode → align →
quantize runs in a worker thread (the sentence model is CPU-bound), then attributes and
codes are written to Redis where rows and serving read them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.settings import Settings
from features.codes_service import CodeAssigner, CodesConfig
from features.content import ContentEncoder
from features.store import OnlineStore
from streams.app import Message, Output
from streams.deadletter import dead_letter, reason_kind
from streams.metrics import WorkerMetrics
from streams.schemas import ItemEvent, decode_message

log = logging.getLogger(__name__)


def make_encoder(kind: str) -> ContentEncoder:
    """The content encoder named by settings: ``minilm`` (real sentence model) or ``hashing``."""
    from features.content import CachedTextEncoder, HashingTextEncoder, SentenceTextEncoder

    if kind == "minilm":
        text = CachedTextEncoder(SentenceTextEncoder())
    elif kind == "hashing":
        text = CachedTextEncoder(HashingTextEncoder())
    else:
        raise ValueError(f"HEADWATER_CONTENT_ENCODER must be 'minilm' or 'hashing', got {kind!r}")
    return ContentEncoder(text)


def item_doc(ev: ItemEvent) -> dict[str, Any]:
    doc: dict[str, Any] = {"item_id": str(ev.item_id), "ts": ev.ts, "tags": list(ev.tags)}
    if ev.text is not None:
        doc["text"] = ev.text
    if ev.vectors:
        doc["vectors"] = ev.vectors
    doc.update({k: v for k, v in ev.attributes.items() if k not in doc})
    return doc


class ItemHandler:
    """Decode item events, store attributes, assign and store codes."""

    def __init__(self, settings: Settings, client, metrics: WorkerMetrics, state,
                 assigner: CodeAssigner | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.metrics = metrics
        self.state = state
        self.store = OnlineStore(client, partitions=settings.partitions)
        self._assigner = assigner
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="codes")

    def assigner(self) -> CodeAssigner:
        if self._assigner is None:
            cfg = CodesConfig(levels=self.settings.code_levels,
                              codebook_size=self.settings.codebook_size, vq_k=self.settings.vq_k)
            self._assigner = CodeAssigner(make_encoder(self.settings.content_encoder), cfg)
        return self._assigner

    async def refresh(self) -> int:
        """Re-fit the codebooks on the items seen (scheduled), store codes that changed.

        The refresh warm-starts from the old centroids and matches a fresh fit to them
        (features.codebooks), so code ids keep their meaning for the ranker; only items
        whose codes actually moved are rewritten.
        """
        assigner = self._assigner
        if assigner is None or not assigner.rq.fitted:
            return 0
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.pool, assigner.refresh)
        changed = {i: result.codes[i] for i in result.changed_ids}
        for item_id, c in changed.items():
            await self.store.set_item_codes(item_id, {"rq": c["rq"], "vq": c["vq"]}, c["version"])
        log.info("codebook refresh: %d of %d items changed codes (version %s)",
                 len(changed), result.n_items, assigner.version)
        return len(changed)

    async def __call__(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        t0 = time.perf_counter()
        outputs: list[Output] = []
        docs: list[dict[str, Any]] = []
        for offset, key, value in messages:
            self.metrics.messages_in.labels(topic).inc()
            decoded = decode_message(value, ItemEvent, self.settings.max_message_bytes)
            self.metrics.events_in.labels(topic).inc(len(decoded.events) + len(decoded.errors))
            for index, raw, reason in decoded.errors:
                outputs.append((self.topics["dead-letter"], key,
                                dead_letter(reason, topic, partition, offset, raw, index), None))
                self.metrics.dead_letters.labels(topic, reason_kind(reason)).inc()
            docs.extend(item_doc(ev) for ev in decoded.events)
        if not docs:
            return outputs
        self.metrics.events_valid.labels(topic).inc(len(docs))
        attrs = {d["item_id"]: {k: v for k, v in d.items() if k not in ("text", "vectors", "item_id")}
                 for d in docs}
        await self.store.put_item_attributes(attrs)
        loop = asyncio.get_running_loop()
        codes = await loop.run_in_executor(self.pool, self.assigner().assign, docs)
        for item_id, c in codes.items():
            await self.store.set_item_codes(item_id, {"rq": c["rq"], "vq": c["vq"]}, c["version"])
        self.metrics.items_coded.inc(len(codes))
        self.metrics.code_seconds.observe(time.perf_counter() - t0)
        return outputs
