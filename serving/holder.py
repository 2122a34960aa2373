"""The model holder: versions with TF-Serving-like states and atomic swaps.

A new version is loaded **beside** the serving one, on the holder's own loader thread
(never the event loop), by :class:`serving.loader.ModelLoader` (verify, load, rebuild,
sanity checks, quality gate); the serving pin lives in the store
(:class:`serving.pins.ServingPin`). Only then is it swapped in by one reference assignment
(``self._current = served``). A request reads :attr:`ModelHolder.current` once and
scores on that object to the end, so in-flight requests finish on the model they began
with and a refused checkpoint never serves.

States (``GET /v1/models``):

``LOADING``   being verified / loaded / warmed on the loader thread;
``AVAILABLE`` loaded in memory and good (serving, or kept for rollback / after a pin);
``FAILED``    refused; ``error`` says why (it is never retried: versions are immutable);
``RETIRED``   good (or never tried) but not in memory; pin or rollback reload it.

All state changes run on one loader thread (:meth:`ModelHolder.submit` from the event
loop; directly only before serving starts), so loads, pins and rollbacks are serialized
without further locking; readers only take immutable snapshots.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from features.schema import FeatureSchema
from learner.store import CheckpointError, ModelStore, StoreUnavailable
from serving.loader import ModelLoader
from serving.metrics import ServingMetrics
from serving.models import (
    HolderError,
    LoadFailure,
    ServedModel,
    VersionInfo,
    VersionState,
    normalize_version,
)
from serving.pins import ServingPin
from serving.traced import TracedForwards

__all__ = [
    "HolderError",
    "LoadFailure",
    "ModelHolder",
    "ServedModel",
    "VersionInfo",
    "VersionState",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def to_evict(loaded: list[str], serving: str | None, keep_loaded: int) -> list[str]:
    """Loaded versions to drop from memory: keep the serving one, then the previous one
    (instant rollback), then the newest standbys, up to ``keep_loaded`` in all.

    >>> to_evict(["000001", "000002", "000003", "000004"], "000003", 2)
    ['000004', '000001']
    >>> to_evict(["000001", "000002"], None, 1)
    ['000001']
    """
    if len(loaded) <= keep_loaded:
        return []
    others = [v for v in loaded if v != serving]
    below = sorted((v for v in others if serving and int(v) < int(serving)), key=int, reverse=True)
    rest = sorted((v for v in others if v not in below), key=int, reverse=True)
    ranked = below[:1] + rest + below[1:]
    return ranked[keep_loaded - (1 if serving else 0):]


class ModelHolder:
    """Load, check, swap, pin and roll back versions of one model from a :class:`ModelStore`.

    Parameters
    ----------
    store
        The model store (``<root>/<model>/<version>/``); its ``pins.json`` holds the
        serving pin, so a pin survives restarts and is protected from retention.
    schema
        The feature schema of the rows this process builds; a checkpoint whose
        ``feature_schema_hash`` differs is refused.
    keep_loaded
        Models kept in memory: the serving one plus ``keep_loaded - 1`` others
        (the previous version first, for an instant rollback).
    quality_metric, quality_margin
        Quality gate: refuse a version whose publication ``metrics[quality_metric]``
        is lower than the serving model's by more than ``quality_margin``
        (``None``: gate off). Missing or non-finite metrics pass.
    warmup_rows
        Rows of the warm-up batch (random tokens, a cold-start row of zeros).
    loader_nice
        ``nice`` increment of the loader thread (Linux: per thread), so verifying and
        loading a new version takes CPU from scoring only when scoring leaves some.
    traced_forward
        Serve each version with its architecture's traced forward when it scores the
        warm-up batch bit for bit as the eager one (serving/traced.py).
    """

    def __init__(
        self,
        store: ModelStore,
        schema: FeatureSchema,
        *,
        metrics: ServingMetrics | None = None,
        keep_loaded: int = 2,
        quality_metric: str = "auc",
        quality_margin: float | None = None,
        warmup_rows: int = 16,
        max_failed_listed: int = 20,
        loader_nice: int = 10,
        clock: Callable[[], float] = time.time,
        item_content: Any = None,
        traced_forward: bool = True,
    ) -> None:
        if keep_loaded < 1:
            raise ValueError(f"keep_loaded must be >= 1, got {keep_loaded}")
        self.store = store
        self.schema = schema
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.keep_loaded = keep_loaded
        self.loader = ModelLoader(store, schema, quality_metric=quality_metric,
                                  quality_margin=quality_margin, warmup_rows=warmup_rows,
                                  item_content=item_content,
                                  traced=TracedForwards(enabled=traced_forward))
        self.serving_pin = ServingPin(store)
        self.max_failed_listed = max_failed_listed
        self.clock = clock
        self.last_error: str | None = None
        self.swaps = 0
        self._current: ServedModel | None = None
        self._pinned: str | None = None
        self._versions: dict[str, VersionInfo] = {}
        self._lock = threading.Lock()  # guards _versions for readers on other threads
        self.loader_nice = loader_nice
        self._loader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-loader", initializer=self._lower_priority
        )

    def _lower_priority(self) -> None:
        """Loads yield the CPU to scoring: on Linux ``nice`` applies to one thread."""
        if self.loader_nice and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.loader_nice)
            except OSError as exc:
                log.debug("cannot lower the loader thread's priority: %s", exc)

    # ---- reading (any thread) --------------------------------------------------------
    @property
    def current(self) -> ServedModel | None:
        """The serving model; read it once per request and use that object throughout."""
        return self._current

    @property
    def pinned(self) -> str | None:
        return self._pinned

    def info(self, version: str) -> VersionInfo | None:
        with self._lock:
            return self._versions.get(version)

    def listing(self) -> dict[str, Any]:
        """The ``GET /v1/models`` document, newest version first."""
        cur = self._current
        serving = cur.version if cur else None
        with self._lock:
            infos = sorted(self._versions.values(), key=lambda i: int(i.version), reverse=True)
        return {
            "model": self.store.model,
            "serving": serving,
            "pinned": self._pinned,
            "models": [i.to_json(serving, self._pinned) for i in infos],
        }

    # ---- the async seam (the event loop never blocks on a load) ----------------------
    async def submit(self, change: Callable[..., T], *args: Any) -> T:
        """Run a state change (``holder.offer``, ``holder.pin``...) on the loader thread.

        ``await holder.submit(holder.pin, "000003")``: every change goes through the one
        loader thread, so changes are serialized and the event loop keeps serving.
        """
        return await asyncio.get_running_loop().run_in_executor(self._loader, change, *args)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    # ---- state changes (loader thread, or synchronously before serving starts) -------
    def start(self) -> str | None:
        """Serve the pinned version, else the newest good one; return it (None: none yet).

        Called once before the update topic is consumed, so a restart serves at once.
        """
        try:
            versions = self.store.versions()
            pinned = self.serving_pin.read()
        except StoreUnavailable as exc:
            # serve nothing (or the baseline) for now; the store rescan offers versions later
            self._record_error(f"model store unreachable at start: {exc}")
            return None
        except CheckpointError as exc:
            self._record_error(f"ignoring the serving pin: {exc}")
            pinned = None
        if pinned is not None and pinned in versions:
            self._pinned = pinned
            if self._load_and_register(pinned) is not None:
                self._swap(pinned)
            else:
                self._record_error(
                    f"pinned version {pinned} is not loadable; serving the newest good version "
                    "instead (unpin or pin another version)"
                )
        elif pinned is not None:
            self._record_error(f"pinned version {pinned} is not in the store; pin ignored")
        if self._current is None:
            for v in reversed(versions):
                if self._load_and_register(v) is not None:
                    self._swap(v)
                    break
        served = self._current.version if self._current else None
        for v in versions:
            if v not in self._versions:
                self._register_unloaded(v)
        self._evict()
        return served

    def offer(self, version: str) -> bool:
        """A version was published: load and check it, swap if it is the one to serve.

        Idempotent: a version already known is not loaded again. Returns True if it swapped.
        """
        version = normalize_version(version)
        if self.info(version) is not None:
            # Known by number; after a store wipe the number may name another model.
            self._forget_if_replaced(self.store.versions())
            if self.info(version) is not None:
                return False
        if not self.store.exists(version):
            # Pruned by retention (an old message replayed from the topic) or not visible
            # on this filesystem yet: the store rescan will offer it again if it appears.
            log.debug("version %s announced but not in the store; ignored", version)
            return False
        with self._lock:
            newest_known = max((int(v) for v in self._versions), default=0)
        if int(version) < newest_known:
            self._register_unloaded(version)  # older than what we know: nothing to serve
            return False
        latest = self.store.latest()
        if latest is not None and int(latest) > int(version) and self.info(latest) is None:
            # Publications outpace loads: skip to the newest instead of working through a
            # backlog of versions that would be superseded the moment they were swapped in.
            self._register_unloaded(version)
            version = latest
        if self._load_and_register(version) is None:
            return False
        cur = self._current
        swapped = False
        if self._pinned is None and (cur is None or int(version) > int(cur.version)):
            self._swap(version)
            swapped = True
        self._evict()
        return swapped

    def rescan(self) -> None:
        """Fallback for a missed update message: offer every store version newer than known.

        Also notices a wiped or replaced store (:meth:`replaced_because`) and forgets the
        old store's versions first, so its model stops serving the new run's requests.
        """
        versions = self.store.versions()
        self._forget_if_replaced(versions)
        newest_known = max((int(v) for v in self._versions), default=0)
        for v in versions:
            if int(v) > newest_known and self.info(v) is None:
                self.offer(v)
        present = set(versions)
        with self._lock:
            for v, i in list(self._versions.items()):
                # Retention deleted it; a loaded copy stays usable until evicted.
                if v not in present and i.served is None and i.state is VersionState.RETIRED:
                    del self._versions[v]

    def replaced_because(self, versions: list[str]) -> str | None:
        """Why the store no longer holds the versions this holder knows, or ``None``.

        ``versions`` is the store's listing. Retention never deletes the newest version,
        so the newest known version missing while the store's newest is older means the
        store was wiped or replaced; so does the serving version's number naming a
        checkpoint with another sha256 (a new run's numbering caught up).
        """
        with self._lock:
            newest = max(self._versions, key=int, default=None)
        if newest is not None and newest not in versions and (
            not versions or int(versions[-1]) < int(newest)
        ):
            return (f"its newest version is {versions[-1] if versions else 'none'}, older than "
                    f"{newest}, which is gone")
        cur = self._current
        if cur is not None and cur.version in versions:
            try:
                sha = self.store.manifest(cur.version).get("sha256")
            except CheckpointError:
                return None  # pruned or unreadable now: not evidence of another store
            if sha != cur.manifest.get("sha256"):
                return f"its version {cur.version} is another checkpoint (sha256 differs)"
        return None

    def _forget_if_replaced(self, versions: list[str]) -> None:
        why = self.replaced_because(versions)
        if why is None:
            return
        self._record_error(
            f"model store of {self.store.model} was replaced ({why}): forgot its old "
            "versions and started over on this store (the baseline ranker serves until one "
            "of its versions loads)"
        )
        self.store.forget_cached()
        with self._lock:
            self._versions.clear()
        self._current = None  # requests read it once: in-flight ones finish on the old model
        self._pinned = None
        self.metrics.serving_changed(None, None)
        self.start()  # the pin and the newest good version of this store, as at a restart

    def pin(self, version: str) -> str:
        """Serve ``version`` and ignore newer ones until :meth:`unpin`; persist the pin."""
        version = normalize_version(version)
        info = self.info(version)
        if info is None and version not in self.store.versions():
            raise HolderError(404, f"model {self.store.model} has no version {version}")
        if info is not None and info.state is VersionState.FAILED:
            raise HolderError(
                409, f"version {version} failed its checks and cannot serve: {info.error}"
            )
        served = info.served if info is not None else None
        if served is None:
            served = self._load_and_register(version)
            if served is None:
                raise HolderError(
                    409, f"version {version} cannot serve: {self.info(version).error}"
                )
        self.serving_pin.write(version)
        self._pinned = version
        if self._current is None or self._current.version != version:
            self._swap(version)
        self._evict()
        return version

    def unpin(self) -> str | None:
        """Drop the pin and serve the newest good version again; return the serving version."""
        self.serving_pin.write(None)
        self._pinned = None
        cur = self._current
        for v in reversed(self.store.versions()):
            if cur is not None and int(v) <= int(cur.version):
                break
            info = self.info(v)
            if info is not None and info.state is VersionState.FAILED:
                continue
            served = info.served if info is not None else None
            if served is None and self._load_and_register(v) is None:
                continue
            self._swap(v)
            break
        self._evict()
        return self._current.version if self._current else None

    def rollback(self) -> str:
        """Serve the newest good version older than the serving one, and pin it."""
        cur = self._current
        if cur is None:
            raise HolderError(409, "no model is serving: nothing to roll back from")
        with self._lock:
            older = sorted(
                (
                    i
                    for i in self._versions.values()
                    if int(i.version) < int(cur.version)
                    and i.state in (VersionState.AVAILABLE, VersionState.RETIRED)
                ),
                key=lambda i: int(i.version),
                reverse=True,
            )
        for info in older:
            if info.served is None and self._load_and_register(info.version) is None:
                continue
            self.serving_pin.write(info.version)
            self._pinned = info.version
            self._swap(info.version)
            self._evict()
            return info.version
        raise HolderError(409, f"no good version older than {cur.version} to roll back to")

    # ---- internals ------------------------------------------------------------------
    def _set(self, info: VersionInfo) -> None:
        with self._lock:
            self._versions[info.version] = info
            failed = sorted(
                (v for v, i in self._versions.items() if i.state is VersionState.FAILED), key=int
            )
            for v in failed[: max(0, len(failed) - self.max_failed_listed)]:
                del self._versions[v]

    def _record_error(self, message: str) -> None:
        self.last_error = message
        log.warning(message)

    def _register_unloaded(self, version: str) -> None:
        try:
            m = self.store.manifest(version)
            self._set(
                VersionInfo(
                    version,
                    VersionState.RETIRED,
                    created_at=m.get("created_at"),
                    metrics=m.get("metrics") or {},
                )
            )
        except CheckpointError as exc:
            if not self.store.exists(version):
                # Retention deleted it after it was announced (with deltas on, a newer
                # full checkpoint supersedes the deltas before it): gone, not bad.
                log.debug("version %s was pruned from the store before it was listed", version)
                return
            self._set(VersionInfo(version, VersionState.FAILED, error=str(exc)))

    def _load_and_register(self, version: str) -> ServedModel | None:
        """Load + check on this thread; register the outcome; never raises for a bad checkpoint."""
        t0 = time.perf_counter()
        prev = self.info(version)
        self._set(
            VersionInfo(
                version,
                VersionState.LOADING,
                created_at=prev.created_at if prev else None,
                metrics=prev.metrics if prev else {},
            )
        )
        try:
            served = self.load(version)
        except LoadFailure as exc:
            if not self.store.exists(version):
                # Retention deleted it mid-load: not a bad checkpoint, just gone.
                with self._lock:
                    self._versions.pop(version, None)
                log.info("version %s was pruned from the store while loading", version)
                return None
            self.metrics.load_failures.labels(exc.reason).inc()
            self._set(
                VersionInfo(
                    version,
                    VersionState.FAILED,
                    error=str(exc),
                    created_at=prev.created_at if prev else None,
                    metrics=prev.metrics if prev else {},
                )
            )
            self._record_error(f"refused {self.store.model} version {version}: {exc}")
            return None
        except StoreUnavailable as exc:
            # The store, not the version, is the problem: forget the attempt so the next
            # announcement or rescan tries again.
            with self._lock:
                self._versions.pop(version, None)
            self.metrics.load_failures.labels("unavailable").inc()
            self._record_error(f"cannot load {self.store.model} version {version} now: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - an unexpected bug must not kill the loader
            log.exception("unexpected error loading version %s", version)
            self.metrics.load_failures.labels("error").inc()
            self._set(VersionInfo(version, VersionState.FAILED, error=f"unexpected error: {exc!r}"))
            self._record_error(
                f"refused {self.store.model} version {version}: unexpected error {exc!r}"
            )
            return None
        if served.base is not None:
            self.metrics.deltas_applied.labels("patched" if served.patched else "rebuilt").inc()
        self._set(
            VersionInfo(
                version,
                VersionState.AVAILABLE,
                created_at=served.created_at,
                metrics=served.manifest.get("metrics") or {},
                served=served,
                load_seconds=round(time.perf_counter() - t0, 4),
            )
        )
        return served

    def _swap(self, version: str) -> None:
        info = self.info(version)
        assert info is not None and info.served is not None, version
        self._current = info.served  # the swap: one reference assignment
        self.swaps += 1
        self.metrics.swaps.inc()
        self.metrics.serving_changed(version, info.served.created_at)
        if info.load_seconds is not None:
            self.metrics.swap_seconds.observe(info.load_seconds)
        log.info("serving %s version %s", self.store.model, version)

    def _evict(self) -> None:
        """Keep the serving model plus the ``keep_loaded - 1`` most useful others in memory."""
        cur = self._current
        with self._lock:
            loaded = [i for i in self._versions.values() if i.served is not None]
        doomed = set(to_evict([i.version for i in loaded], cur.version if cur else None,
                              self.keep_loaded))
        for info in loaded:
            if info.version in doomed:
                self._set(replace(info, state=VersionState.RETIRED, served=None))

    def load(self, version: str) -> ServedModel:
        """Verify, load, rebuild and check one version (:class:`~serving.loader.ModelLoader`)."""
        return self.loader.load(version, self._current, self._base_for_delta)

    def _base_for_delta(self, base: str) -> ServedModel | None:
        """Full checkpoint ``base`` loaded: from memory (the serving model's base, a
        standby), else loaded and registered like any version; ``None`` if it cannot be."""
        with self._lock:
            loaded = [i.served for i in self._versions.values() if i.served is not None]
        for served in [self._current, *loaded]:
            found = served.base_for(base) if isinstance(served, ServedModel) else None
            if found is not None:
                return found
        info = self.info(base)
        if (info is not None and info.state is VersionState.FAILED) or not self.store.exists(base):
            return None
        return self._load_and_register(base)
