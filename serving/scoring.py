"""Scoring: request validation, then features → rows → one forward pass.

The row path is the training one (docs/design.md principle 4): counters, attributes and item
codes come from :meth:`features.store.OnlineStore.get_online_features` for all
candidates at once (one pipelined round trip, plus one for item attributes missing from
the store's short cache), and :meth:`features.rows.RowBuilder.score_matrices` encodes
them exactly as the worker encodes training rows (the columns of ``build_for_scoring``,
written straight into the model's two arrays). Unknown users and items are
not errors: their counters read as zero and their tokens take the model's cold-start
rows.

Validation never trusts the body: every failure is a :class:`RequestError` naming the
field, which the app answers with 400 (or 413 for too many candidates).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.exceptions

from features.hashing import canonical
from serving.ranker import Ranker

__all__ = ["ForwardBatcher", "ReadCoalescer", "RequestError", "ScoreRequest", "Scored", "Scorer",
           "parse_score_request"]

MAX_ID_CHARS = 256
MAX_OBJECT_KEYS = 64


class RequestError(Exception):
    """A request the client must fix; ``field`` names the offending input."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True)
class ScoreRequest:
    """A validated ``POST /v1/score`` body."""

    user_id: str | int
    candidates: list[str | int]
    context: dict[str, Any] | None = None
    user: dict[str, Any] | None = None


def _texts(ids: list[str | int]) -> list[str]:
    """Checked ids (strings, integers) as their canonical texts: a string is its own,
    anything else goes through :func:`features.hashing.canonical`.

    >>> _texts(["a", 7, -2])
    ['a', '7', '-2']
    """
    return [i if type(i) is str else canonical(i) for i in ids]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _check_id(value: Any, field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(
            f"{field} must be a string or an integer, got {type(value).__name__}", field
        )
    if isinstance(value, str) and not (0 < len(value) <= MAX_ID_CHARS):
        raise RequestError(f"{field} must have 1 to {MAX_ID_CHARS} characters", field)
    if isinstance(value, int) and not (-(2**63) <= value < 2**63):
        raise RequestError(f"{field} is out of the 64-bit integer range", field)
    return value


def _check_object(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(
            f"{field} must be an object of field: value, got {type(value).__name__}", field
        )
    if len(value) > MAX_OBJECT_KEYS:
        raise RequestError(
            f"{field} has {len(value)} keys; at most {MAX_OBJECT_KEYS} are accepted", field
        )
    for k, v in value.items():
        if v is not None and (
            isinstance(v, (dict, list)) or not isinstance(v, (str, int, float, bool))
        ):
            raise RequestError(
                f"{field}.{k} must be a string, number, boolean or null", f"{field}.{k}"
            )
        if isinstance(v, str) and len(v) > MAX_ID_CHARS:
            raise RequestError(
                f"{field}.{k} is longer than {MAX_ID_CHARS} characters", f"{field}.{k}"
            )
    return dict(value)


def parse_score_requests(body: bytes, max_candidates: int) -> list[ScoreRequest] | ScoreRequest:
    """A ``/v1/score`` body: one request, or ``{"requests": [...]}`` (a list of them).

    ``max_candidates`` bounds the candidates of all requests together.

    >>> reqs = parse_score_requests(
    ...     b'{"requests": [{"user_id": 1, "candidates": ["a"]}, {"user_id": 2, "candidates": []}]}', 10)
    >>> [(r.user_id, r.candidates) for r in reqs]
    [(1, ['a']), (2, [])]
    >>> parse_score_requests(b'{"requests": []}', 10)
    Traceback (most recent call last):
    ...
    serving.scoring.RequestError: requests must be a non-empty list of score requests
    """
    doc = _load_object(body)
    if "requests" not in doc:
        return _parse_one(doc, max_candidates)
    items = doc["requests"]
    if not isinstance(items, list) or not items:
        raise RequestError("requests must be a non-empty list of score requests", "requests")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(f"requests[{i}] must be an object", f"requests[{i}]")
        try:
            out.append(_parse_one(item, max_candidates))
        except RequestError as exc:
            raise RequestError(f"requests[{i}]: {exc}", f"requests[{i}].{exc.field}",
                               exc.status) from None
    total = sum(len(r.candidates) for r in out)
    if total > max_candidates:
        raise RequestError(
            f"requests carry {total} candidates; at most {max_candidates} are accepted per call "
            "(HEADWATER_MAX_CANDIDATES): split the batch",
            "requests",
            status=413,
        )
    return out


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("body is nested too deeply", "body") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"body is not valid JSON: {exc}", "body") from None
    if not isinstance(doc, dict):
        raise RequestError(f"body must be a JSON object, got {type(doc).__name__}", "body")
    return doc


def parse_score_request(body: bytes, max_candidates: int) -> ScoreRequest:
    """Validate a ``/v1/score`` body.

    >>> parse_score_request(b'{"user_id": 7, "candidates": ["a", 2]}', 10).candidates
    ['a', 2]
    >>> parse_score_request(b'{"user_id": 7}', 10)
    Traceback (most recent call last):
    ...
    serving.scoring.RequestError: candidates is required: a list of item ids
    """
    return _parse_one(_load_object(body), max_candidates)


def _parse_one(doc: dict[str, Any], max_candidates: int) -> ScoreRequest:
    if "user_id" not in doc:
        raise RequestError("user_id is required", "user_id")
    user_id = _check_id(doc["user_id"], "user_id")
    if "candidates" not in doc:
        raise RequestError("candidates is required: a list of item ids", "candidates")
    cands = doc["candidates"]
    if not isinstance(cands, list):
        raise RequestError(
            f"candidates must be a list of item ids, got {type(cands).__name__}", "candidates"
        )
    if len(cands) > max_candidates:
        raise RequestError(
            f"candidates has {len(cands)} items; at most {max_candidates} are accepted per request "
            "(HEADWATER_MAX_CANDIDATES): split the list",
            "candidates",
            status=413,
        )
    if all(type(c) is str and 0 < len(c) <= MAX_ID_CHARS for c in cands):
        candidates = cands  # the common case, checked in one pass
    else:  # the first bad one named
        candidates = [_check_id(c, f"candidates[{i}]") for i, c in enumerate(cands)]
    context = _check_object(doc.get("context"), "context")
    user = _check_object(doc.get("user"), "user")
    return ScoreRequest(user_id, candidates, context, user)


@dataclass(frozen=True)
class Scored:
    """One request's scores and the exact rows the model saw (tokens ``[n, F]``, dense
    ``[n, D]``, in schema order) at time ``ts``."""

    scores: np.ndarray
    categorical: np.ndarray
    dense: np.ndarray
    ts: float


class Scorer:
    """Features for all candidates in one read, rows by the shared builder, one forward pass.

    ``store`` is an async :class:`features.store.OnlineStore`; ``builder`` a
    :class:`features.rows.RowBuilder` (its ``schema`` is what checkpoints must match).
    Row encoding and the forward pass run together on ``executor`` (a small thread
    pool: torch releases the GIL, and the event loop keeps serving I/O meanwhile), or,
    with ``executor`` None (the default, ``HEADWATER_SERVE_INFERENCE_THREADS=0``), on the
    event loop itself: the hand-off to a thread and back cost more than a small forward
    pass (GIL switches of up to ``sys.getswitchinterval()`` each), and several serving
    processes (``--workers``) use the cores instead.
    """

    #: Redis errors a feature read retries (a restart, an outage, an AOF still loading).
    TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def __init__(
        self,
        store: Any,
        builder: Any,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
        redis_retry_seconds: float = 3.0,
        batch_rows: int = 0,
        read_rows: int = 0,
    ) -> None:
        self.store = store
        #: the feature reads of requests that ask in the same event-loop turn go to the
        #: store as one read of at most this many rows (0: one read per request)
        self.reads = ReadCoalescer(store, read_rows) if read_rows > 0 else None
        #: inline scoring coalesces the rows of requests ready in the same event-loop turn
        #: into one forward pass of at most this many rows (0: one forward per request)
        self.batcher = ForwardBatcher(batch_rows) if batch_rows > 0 else None
        self._reading = 0  # requests of this scorer waiting for their features
        self.redis_retry_seconds = redis_retry_seconds
        #: feature reads retried after a transient Redis error (status and tests read it)
        self.redis_retries = 0
        self.builder = builder
        self.schema = builder.schema
        self.schema_hash = self.schema.hash  # every impression carries it: hashed once
        self.executor = executor
        self.clock = clock
        self._cat_cols = [f"c:{f}" for f in self.schema.categorical]
        self._dense_cols = [f"d:{d}" for d in self.schema.dense]

    async def features(self, req: ScoreRequest, now: float) -> tuple[Mapping[str, Any], float]:
        """One read for every candidate, and the time it was read at: ``now``, or, for a
        read coalesced with others of the same loop turn (:class:`ReadCoalescer`), the
        latest ``now`` among them. Through a Redis restart it retries with backoff for at
        most ``redis_retry_seconds`` (then the error is the request's answer)."""
        n = len(req.candidates)  # as columns of canonical ids: no dict per candidate
        rows = {"user_id": np.full(n, canonical(req.user_id), dtype=object),
                "item_id": np.array(_texts(req.candidates), dtype=object),
                "context": [req.context] * n}
        deadline = time.monotonic() + self.redis_retry_seconds
        delay = 0.05
        while True:
            try:
                if self.reads is not None:
                    return await self.reads.read(rows, now)
                return await self.store.get_online_features(rows, now=now), now
            except self.TRANSIENT:
                if time.monotonic() + delay > deadline:
                    raise
                self.redis_retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    def batching_stats(self) -> dict[str, Any]:
        """Coalesced reads and batched forwards so far: ``{"reads": {"calls", "requests",
        "at_once"}, "forwards": {"calls", "requests"}}``, ``None`` for one that is off."""
        return {
            "reads": None if self.reads is None
            else {"calls": self.reads.reads, "requests": self.reads.requests,
                  "at_once": self.reads.at_once},
            "forwards": None if self.batcher is None
            else {"calls": self.batcher.forwards, "requests": self.batcher.requests},
        }

    def encode(
        self, req: ScoreRequest, feats: Mapping[str, Any], now: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, F]`` int64 and dense ``[n, D]`` float32, in schema order."""
        return self.builder.score_matrices(
            req.user_id, req.user, req.context, req.candidates, feats, now=now
        )

    def _encode_and_predict(
        self, served: Ranker, req: ScoreRequest, feats: Mapping[str, Any], now: float
    ) -> Scored:
        cat, dense = self.encode(req, feats, now)
        return Scored(served.predict(cat, dense), cat, dense, now)

    async def score(self, served: Ranker, req: ScoreRequest) -> np.ndarray:
        """Scores in candidate order, all from ``served`` (the model the request started with)."""
        return (await self.score_rows(served, req)).scores

    async def score_rows(self, served: Ranker, req: ScoreRequest) -> Scored:
        """Scores with the rows they were computed from (what an impression logs)."""
        if not req.candidates:
            return Scored(np.zeros(0), np.zeros((0, len(self._cat_cols)), np.int64),
                          np.zeros((0, len(self._dense_cols)), np.float32), self.clock())
        self._reading += 1
        try:
            feats, now = await self.features(req, self.clock())
        finally:
            self._reading -= 1
        if self.executor is None:  # inline: no thread hand-off, no GIL ping-pong
            if self.batcher is None:
                return self._encode_and_predict(served, req, feats, now)
            cat, dense = self.encode(req, feats, now)
            scores = await self.batcher.predict(served, cat, dense, last=self._reading == 0)
            return Scored(scores, cat, dense, now)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._encode_and_predict, served, req, feats, now
        )


class ReadCoalescer:
    """Coalesced feature reads: one store read for the requests that ask in the same
    event-loop turn.

    Under load, requests arrive together: while the loop runs a forward pass, the next
    requests wait in their sockets, and the loop takes them in one turn. Read one by one,
    each pays the per-request path on its own (its candidates' entity names, cache
    look-ups, decay and derived features: Python per candidate, ~1 ms for 100 in
    process). Read together, the store resolves every row in one vectorised pass, and an
    item or genre several requests share is looked up and decayed once.

    A request that asks while other callbacks (other requests' handlers) wait to run in
    the same event-loop turn schedules the read with ``call_soon``; every request that
    asks before it runs joins it (at most ``max_rows`` rows per read; more make several
    reads). A request with nothing else queued in its turn reads at once, as without
    coalescing: nothing could join it, and yielding to the loop would let the process's
    other threads take the interpreter lock (the reason :class:`ForwardBatcher` flushes
    a lone request at once too). The rows are read at the latest ``now`` among the
    joined requests (microseconds to the turn's length apart), and each request gets
    that time back with its slice: its rows, its impression and its scores all say the
    time its features were read at. A row's features depend on its own user, item,
    context and time only, so a request's slice is what a read of its rows alone at that
    time gives. A failed read fails every request in it (each then retries on its own
    deadline).

    >>> class Store:
    ...     reads = 0
    ...     async def get_online_features(self, rows, now):
    ...         Store.reads += 1
    ...         return {"n": [f"{u}:{i}" for u, i in zip(rows["user_id"], rows["item_id"])]}
    >>> async def two(c):
    ...     a = {"user_id": [1, 1], "item_id": ["a", "b"], "context": [None, None]}
    ...     b = {"user_id": [2], "item_id": ["c"], "context": [None]}
    ...     return await asyncio.gather(c.read(a, 10.0), c.read(b, 11.0))
    >>> asyncio.run(two(ReadCoalescer(Store(), 64)))
    [({'n': ['1:a', '1:b']}, 11.0), ({'n': ['2:c']}, 11.0)]
    >>> Store.reads
    1
    """

    def __init__(self, store: Any, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.store = store
        self.max_rows = max_rows
        self._pending: list[tuple[Mapping[str, list], float, asyncio.Future]] = []
        #: store reads made, requests they served, and reads of a lone request made at
        #: once (status and tests read them)
        self.reads = 0
        self.requests = 0
        self.at_once = 0
        self._running: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def read(self, rows: Mapping[str, list], now: float) -> tuple[Mapping[str, Any], float]:
        """``(features of rows, the time they were read at)``."""
        loop = asyncio.get_running_loop()
        if not self._pending and not _turn_has_more(loop):
            # nothing else is queued to run in this turn: no request can join, so read at
            # once (yielding would let the process's other threads take the GIL)
            self.reads += 1
            self.requests += 1
            self.at_once += 1
            return await self.store.get_online_features(rows, now=now), now
        fut = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((rows, now, fut))
        return await fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        chunk: list = []
        size = 0
        for item in pending:
            n = len(item[0]["item_id"])
            if chunk and size + n > self.max_rows:
                self._start(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += n
        if chunk:
            self._start(chunk)

    def _start(self, chunk: list[tuple[Mapping[str, Any], float, asyncio.Future]]) -> None:
        task = asyncio.ensure_future(self._run(chunk))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, chunk: list[tuple[Mapping[str, Any], float, asyncio.Future]]) -> None:
        now = max(item[1] for item in chunk)
        if len(chunk) == 1:
            rows = chunk[0][0]
        else:
            rows = {k: np.concatenate([item[0][k] for item in chunk])
                    if isinstance(col, np.ndarray) else [v for item in chunk for v in item[0][k]]
                    for k, col in chunk[0][0].items()}
        try:
            feats = await self.store.get_online_features(rows, now=now)
        except BaseException as exc:  # every joined request answers with the error
            for *_, fut in chunk:
                if fut.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):  # the server is stopping
                    fut.cancel()
                else:
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.reads += 1
        self.requests += len(chunk)
        if len(chunk) == 1:
            if not chunk[0][2].done():
                chunk[0][2].set_result((feats, now))
            return
        start = 0
        for item_rows, _, fut in chunk:
            end = start + len(item_rows["item_id"])
            if not fut.done():  # a client that went away cancelled its wait
                fut.set_result((_rows_slice(feats, start, end), now))
            start = end


def _turn_has_more(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether callbacks (e.g. other requests' handlers) wait to run in the loop's current
    turn. asyncio keeps them in ``loop._ready`` (CPython's event loops since 3.4, not a
    public API); on a loop without it, assume there may be."""
    ready = getattr(loop, "_ready", None)
    return ready is None or len(ready) > 0


def _rows_slice(feats: Mapping[str, Any], start: int, end: int) -> Mapping[str, Any]:
    """Rows ``start:end`` of a feature read: every column sliced (views of the arrays),
    and a derived-features block (:class:`features.counters.DerivedFeatures`) kept as a
    block of those rows.

    >>> import numpy as np
    >>> from features.counters import CounterConfig, CounterSpec, derive_features
    >>> cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=())
    >>> f = derive_features(cfg, np.arange(6.0).reshape(3, 1, 2))
    >>> f["user_attrs"] = [None, {"a": 1}, None]
    >>> part = _rows_slice(f, 1, 3)
    >>> part["item_clicks_total"].tolist(), part["user_attrs"], part.block.shape
    ([3.0, 5.0], [{'a': 1}, None], (3, 2))
    """
    part = type(feats)((k, v[start:end]) for k, v in feats.items())
    block = getattr(feats, "block", None)
    if block is not None:
        part.block, part.names = block[:, start:end], feats.names
    return part


class ForwardBatcher:
    """Dynamic batching on the event loop: one forward pass for concurrent requests.

    A request whose rows are built hands them to :meth:`predict` and waits; the first
    one of an event-loop turn schedules a flush with ``call_soon``, so every request
    whose Redis answer arrived in the same turn adds its rows before the flush runs.
    A request that is the ``last`` one (no other is still waiting for its features)
    flushes at once: nothing else can join, and yielding to the loop would let the
    process's other threads take the GIL (up to ``sys.getswitchinterval()``).
    The flush concatenates the rows per model (a request keeps the model it started
    with), runs one forward pass per ``max_rows`` rows and hands each request its
    slice. A lone request waits one loop turn, nothing more: no timer, no added delay.
    Rows are independent in every ranker (no batch statistics at inference), so a
    row's score does not depend on its neighbours.

    >>> import asyncio
    >>> class Double:
    ...     calls = 0
    ...     def predict(self, cat, dense):
    ...         Double.calls += 1
    ...         return dense[:, 0] * 2
    >>> async def three(b, m):
    ...     rows = [np.full((n, 1), float(n)) for n in (1, 2, 3)]
    ...     return await asyncio.gather(*(b.predict(m, r[:, :0], r) for r in rows))
    >>> [s.tolist() for s in asyncio.run(three(ForwardBatcher(8), Double()))]
    [[2.0], [4.0, 4.0], [6.0, 6.0, 6.0]]
    >>> Double.calls
    1
    """

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self._pending: list[tuple[Ranker, np.ndarray, np.ndarray, asyncio.Future]] = []
        #: forward passes run and requests they served (tests and status read them)
        self.forwards = 0
        self.requests = 0

    def predict(self, served: Ranker, cat: np.ndarray, dense: np.ndarray,
                last: bool = False) -> asyncio.Future:
        """A future for ``served``'s scores of these rows, set by the turn's flush (or at
        once when ``last``)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._pending and not last:
            loop.call_soon(self._flush)
        self._pending.append((served, cat, dense, fut))
        if last:
            self._flush()
        return fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:  # flushed early by a ``last`` request
            return
        by_model: dict[int, list[tuple[Ranker, np.ndarray, np.ndarray, asyncio.Future]]] = {}
        for item in pending:
            by_model.setdefault(id(item[0]), []).append(item)
        for group in by_model.values():
            chunk: list = []
            rows = 0
            for item in group:
                if chunk and rows + len(item[1]) > self.max_rows:
                    self._run(chunk)
                    chunk, rows = [], 0
                chunk.append(item)
                rows += len(item[1])
            self._run(chunk)

    def _run(self, chunk: list[tuple[Ranker, np.ndarray, np.ndarray, asyncio.Future]]) -> None:
        served = chunk[0][0]
        try:
            if len(chunk) == 1:
                scores = served.predict(chunk[0][1], chunk[0][2])
            else:
                scores = served.predict(np.concatenate([c[1] for c in chunk]),
                                        np.concatenate([c[2] for c in chunk]))
        except Exception as exc:  # every waiting request answers with the error
            for *_, fut in chunk:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.forwards += 1
        self.requests += len(chunk)
        start = 0
        for _, cat, _, fut in chunk:
            end = start + len(cat)
            if not fut.done():  # a client that went away cancelled its wait
                fut.set_result(scores[start:end])
            start = end
