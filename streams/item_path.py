"""The items path of the worker: item content → attributes and quantized codes in Redis.

Codes are assigned the moment an item's content arrives (cold start): encode → align →
quantize runs in a worker thread (the sentence model is CPU-bound), then attributes and
codes are written to Redis where rows and serving read them.

Codebooks are shared (:mod:`features.codebook_store`): every item's content goes to
Redis, the worker that holds the lease fits the codebooks on all items once enough have
arrived (and refreshes them on a timer), and every worker quantizes with the current
version it loads from Redis, so code ids are the same on every worker and after a
restart (a restarted worker codes new items at once; stored codes stay).

With ``HEADWATER_ALIGN_ONLINE`` a refresh first trains the QARM alignment projection on
the pairs the click agents mined (:mod:`streams.alignment_path`); the projection is
published inside the new codebook version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from core.settings import Settings
from features.codebook_store import CodebookStore
from features.codes_service import CodeAssigner, CodesConfig
from features.content import ContentEncoder
from features.store import OnlineStore
from streams.alignment_path import pair_arrays, train_projection
from streams.deadletter import dead_letter, reason_kind
from streams.events import Message, Output
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
    """Decode item events, store attributes, assign and store codes (shared codebooks)."""

    def __init__(self, settings: Settings, client, metrics: WorkerMetrics, state,
                 assigner: CodeAssigner | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.metrics = metrics
        self.state = state
        self.store = OnlineStore(client, partitions=settings.partitions)
        self._assigner = assigner
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="codes")
        cfg = assigner.config if assigner is not None else self._config()
        name = CodebookStore.config_name(settings.content_encoder, cfg.levels,
                                         cfg.codebook_size, cfg.vq_k)
        self.codebooks = CodebookStore(client, name, settings.codebook_lease_seconds,
                                       self.store.codes_key)
        #: the codebook version loaded into the assigner (``None``: none yet)
        self.version: str | None = None
        #: pairs mined in all (``CodebookStore.pairs_total``) when the projection in force
        #: was trained (stored in its codebook version)
        self.aligned_at = 0

    def _config(self) -> CodesConfig:
        return CodesConfig(levels=self.settings.code_levels,
                           codebook_size=self.settings.codebook_size, vq_k=self.settings.vq_k)

    def assigner(self) -> CodeAssigner:
        if self._assigner is None:
            self._assigner = CodeAssigner(make_encoder(self.settings.content_encoder),
                                          self._config())
        return self._assigner

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def sync(self) -> float:
        """Load the current codebook version if it is not the one in use; returns
        when the current version was published (0: there is none yet)."""
        current, published = await self.codebooks.current()
        if current is not None and current != self.version:
            arrays = await self.codebooks.load(current)
            await self._in_pool(self.assigner().import_codebooks, arrays)
            self.aligned_at = int(arrays.get("align_pairs_total", 0))
            log.info("codebooks: using version %s (was %s)", current, self.version)
            self.version = current
        return published

    async def refresh(self) -> int:
        """Re-fit the shared codebooks on every item (scheduled), store codes that changed.

        Only the lease holder refreshes, and only if the current version is older than
        the refresh period (every worker's timer fires; one refresh per period). The
        refresh warm-starts from the current centroids and matches a fresh fit to them
        (features.codebooks), so code ids keep their meaning for the ranker; only items
        whose codes actually moved are rewritten. Returns how many.
        """
        return await self._fit(refresh=True)

    def _fit_sync(self, ids: list[str], content, refresh: bool, pairs=()):
        assigner = self.assigner()
        before = assigner.quantize(ids, content) if refresh else {}
        aligned = bool(pairs) and self._align(assigner, ids, content, pairs)
        assigner.fit_on(ids, content)
        return assigner.version, assigner.export_codebooks(), before, aligned

    def _align(self, assigner: CodeAssigner, ids: list[str], content, pairs) -> bool:
        """Train the alignment projection on the mined pairs; the refresh applies it."""
        trig, tgt, tid = pair_arrays(pairs, ids, content)
        if len(trig) < self.settings.align_min_pairs:
            log.info("alignment: %d usable pairs, %d needed: projection kept", len(trig),
                     self.settings.align_min_pairs)
            return False
        weights, loss = train_projection(assigner.projection(), trig, tgt, tid, self.settings,
                                         seed=assigner.rq.generation)
        assigner.set_projection(weights)
        log.info("alignment: projection trained on %d pairs (loss %.4f)", len(trig), loss)
        return True

    async def _new_pairs(self) -> tuple[list[tuple[str, str]], int]:
        """The stored pairs if at least ``align_min_pairs`` were mined since the projection
        in force was trained (else none: no re-fit on old evidence), and the mined total."""
        total = await self.codebooks.pairs_total()
        if total - self.aligned_at < self.settings.align_min_pairs:
            return [], total
        return await self.codebooks.pairs(), total

    async def _fit(self, refresh: bool) -> int:
        token = await self.codebooks.acquire()
        if token is None:
            return 0  # another worker fits: its version is loaded at the next sync
        try:
            published = await self.sync()
            if refresh != (self.version is not None):
                return 0  # a first fit already happened, or nothing to refresh yet
            if refresh and time.time() - published < 0.5 * self.settings.codebook_refresh_seconds:
                return 0  # another worker refreshed this period
            ids, content = await self.codebooks.all_content()
            if not refresh and len(ids) < self.assigner().config.fit_threshold:
                return 0
            pairs, total = [], self.aligned_at
            if refresh and self.settings.align_online:
                pairs, total = await self._new_pairs()
            version, arrays, before, aligned = await self._in_pool(
                self._fit_sync, ids, content, refresh, pairs)
            aligned_at = total if aligned else self.aligned_at
            arrays["align_pairs_total"] = np.array(aligned_at, np.int64)
            if not await self.codebooks.publish(token, version, arrays):
                log.warning("codebooks: lease lost while fitting %s: not published", version)
                self.version = None  # the assigner holds an unpublished fit: reload
                return 0
            self.version, self.aligned_at = version, aligned_at
            # Items whose content arrived while fitting are coded too (their workers
            # may have checked the version before this one was published).
            ids, content = await self.codebooks.all_content()
            codes = await self._in_pool(self.assigner().quantize, ids, content)
            moved = {i: c for i, c in codes.items()
                     if i not in before or (before[i]["rq"], before[i]["vq"]) != (c["rq"], c["vq"])}
            await self.codebooks.write_codes(moved, version)
            log.info("codebooks: %s version %s on %d items, %d codes written",
                     "refreshed to" if refresh else "first fit,", version, len(ids), len(moved))
            return len(moved)
        finally:
            await self.codebooks.release(token)

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
        ids, content = await self._in_pool(self.assigner().encode_content, docs)
        # Content first, then the version: a fit published after this sync codes these
        # items itself (it reads every item's content after publishing).
        await self.codebooks.put_content(ids, content)
        await self.sync()
        if self.version is None:
            if await self.codebooks.content_count() >= self.assigner().config.fit_threshold:
                coded = await self._fit(refresh=False)
                self.metrics.items_coded.inc(coded)
        else:
            codes = await self._in_pool(self.assigner().quantize, ids, content)
            await self.codebooks.write_codes(codes, self.version)
            self.metrics.items_coded.inc(len(codes))
        self.metrics.code_seconds.observe(time.perf_counter() - t0)
        return outputs
