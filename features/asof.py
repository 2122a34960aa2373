"""Strict point-in-time counter states: only contributions with event time before the row's.

A shard's entity state ``S`` (its totals and decayed sums, ``t`` the newest event time in
it) is enough for a row at time ``ts`` only when ``S.t < ts``: then every contribution in
it is older than the row and ``S`` decayed to ``ts`` is exact. When ``S.t >= ts`` (the
shard has moved past the row: another partition ahead in event time, a same-timestamp
burst split across batches, a late event), ``S`` cannot be split, so every entity also
keeps a bounded **history** beside its hash (key ``{hw:p<P>}:~h2:<entity>``, written by
``apply.lua``):

- a **head**: ``width + 1`` doubles, the state of every contribution folded out of the
  history (``t`` last: the newest of them; NaN when none was folded);
- then its most recent contributions in the order they were applied, one
  ``(ts, impressions, clicks)`` triple of doubles each (``impressions`` 1 for a labelled
  event, 0 for a click counted at its own time), ``K`` to ``2K - 1`` of them
  (``K`` = ``pit_history``).

Everything the shard holds for the entity is the head plus the entries, so the state as
of ``ts`` is the head (when ``head.t < ts``) plus the entries with event time ``< ts``,
decayed to ``ts``. A row older than the head's time cannot be answered exactly: the head
is then left out (the row sees less than it could, never the future) and the reference is
reported as **truncated** (``headwater_features_pit_truncated_total``).

With ``ties=True`` contributions at exactly the row's time count too: from other shards
all of them, from the row's own partition those applied before it (offset order).

>>> hl = (100.0,)
>>> state = np.array([[3.0, 2.0, 1.5, 1.0, 200.0]])    # three events, the newest at t=200
>>> hist = encode_history(np.array([1.0, 1.0, 1.0, 1.0, 50.0]), [100.0, 200.0], [0.0, 1.0])
>>> pre, trunc = pre_other(hl, state, {0: hist}, np.array([0, 0, 0]),
...                        np.array([100.0, 150.0, 250.0]), ties=False)
>>> pre[:, :2].tolist(), trunc.tolist()                 # ts=100 sees only the event at 50
([[1.0, 1.0], [2.0, 1.0], [3.0, 2.0]], [False, False, False])
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from features.jit import compiled
from features.pointintime import replay_states

__all__ = ["add_others", "decode_history", "encode_history", "pre_other", "pre_others", "pre_own",
           "warm"]


#: doubles per history entry: (ts, impressions, clicks)
ENTRY = 3


def encode_history(head: np.ndarray, ts, label, weight=None) -> bytes:
    """A history: ``head`` (``width + 1`` doubles, ``t`` last) then ``(ts, impressions,
    clicks)`` triples (``weight``: the impressions, 1 each unless given)."""
    ts = np.asarray(ts, "<f8")
    w = np.ones(len(ts)) if weight is None else np.asarray(weight, "<f8")
    entries = np.column_stack([ts, w, np.asarray(label, "<f8")])
    return np.asarray(head, "<f8").tobytes() + entries.astype("<f8").tobytes()


def decode_history(blob: bytes, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(head [width + 1], entries [k, 3])`` of a history: ``(ts, impressions, clicks)``.

    >>> head, ent = decode_history(encode_history(np.zeros(3), [5.0, 6.0], [1.0, 1.0],
    ...                                           [1.0, 0.0]), 2)
    >>> head.tolist(), ent.tolist()
    ([0.0, 0.0, 0.0], [[5.0, 1.0, 1.0], [6.0, 0.0, 1.0]])
    """
    a = np.frombuffer(blob, "<f8")
    if len(a) < width + 1 or (len(a) - width - 1) % ENTRY:
        raise ValueError(f"history of {len(a) * 8} bytes does not fit width {width}")
    return a[: width + 1], a[width + 1 :].reshape(-1, ENTRY)


class _Items:
    """What shards hold, as items ``(segment, ts, values)`` to be summed in time order."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.seg: list[np.ndarray] = []
        self.ts: list[np.ndarray] = []
        self.x: list[np.ndarray] = []
        self.rank: list[np.ndarray] = []  # order among equal times: heads, entries, refs

    def add(self, seg, ts, x, rank) -> None:
        self.seg.append(np.asarray(seg, np.int64).reshape(-1))
        self.ts.append(np.asarray(ts, np.float64).reshape(-1))
        self.x.append(np.asarray(x, np.float64).reshape(-1, self.width))
        self.rank.append(np.asarray(rank, np.float64).reshape(-1))

    def events(self, seg, ts, label, rank, weight=None) -> None:
        x = np.empty((len(ts), self.width))
        x[:, 0::2] = 1.0 if weight is None else np.asarray(weight, np.float64)[:, None]
        x[:, 1::2] = np.asarray(label, np.float64)[:, None]
        self.add(seg, ts, x, rank)

    def histories(
        self, segs, states: np.ndarray, blobs: list[bytes | None], cut: np.ndarray
    ) -> np.ndarray:
        """The shard's items of entities ``segs`` (their states, their histories or None:
        written before histories existed, the state is all there is); returns each head's
        time (NaN: no head). Entries at or after the entity's ``cut`` (no row reading it
        may see them) are left out. Vectorised over entities."""
        W = self.width
        segs = np.asarray(segs, np.int64)
        heads = np.array(states, np.float64).reshape(len(segs), W + 1)
        has = np.fromiter((b is not None for b in blobs), bool, len(blobs))
        if has.any():
            got = [b for b in blobs if b is not None]
            flat = np.frombuffer(b"".join(got), "<f8")
            sizes = np.fromiter(map(len, got), np.int64, len(got)) // 8
            starts = np.cumsum(sizes) - sizes
            if ((sizes < W + 1) | ((sizes - W - 1) % ENTRY != 0)).any():
                raise ValueError(f"history fields do not fit state width {W}")
            heads[has] = flat[starts[:, None] + np.arange(W + 1)]
            k = (sizes - W - 1) // ENTRY
            first = starts + W + 1
            idx = (np.repeat(first - ENTRY * (np.cumsum(k) - k), k)
                   + ENTRY * np.arange(int(k.sum())))
            rank = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
            eseg = np.repeat(segs[has], k)
            keep = flat[idx] < np.repeat(np.asarray(cut, np.float64)[has], k)
            self.events(eseg[keep], flat[idx][keep], flat[idx + 2][keep], rank[keep],
                        flat[idx + 1][keep])
        ok = ~np.isnan(heads[:, W])
        self.add(segs[ok], heads[ok, W], heads[ok, :W], np.full(int(ok.sum()), -1.0))
        return heads[:, W]

    def cumulate(self, half_lives, n_seg: int):
        """Items sorted by (segment, time, rank) and the state after each, at its time."""
        seg, ts = np.concatenate(self.seg), np.concatenate(self.ts)
        x, rank = np.concatenate(self.x), np.concatenate(self.rank)
        order = np.lexsort((rank, ts, seg))
        seg, ts, x = seg[order], ts[order], x[order]
        init = np.zeros((n_seg, self.width + 1))
        init[:, self.width] = np.nan
        rep = replay_states(half_lives, init, seg, ts, None, values=x)
        return order, seg, ts, rep.pre + x


def _decay(half_lives, x: np.ndarray, dt: np.ndarray) -> np.ndarray:
    out = np.array(x, copy=True)
    for j, h in enumerate(half_lives):
        out[:, 2 + 2 * j : 4 + 2 * j] *= np.exp2(-dt / h)[:, None]
    return out


def _states_at(half_lives, seg, ts, post, q_seg, q_ts, p) -> np.ndarray:
    """Per query: the state after sorted items ``[start of its segment, p)``, decayed to its time."""
    out = np.zeros((len(q_seg), post.shape[1]))
    have = p > np.searchsorted(seg, q_seg, "left")
    prev = p[have] - 1
    out[have] = _decay(half_lives, post[prev], q_ts[have] - ts[prev])
    return out


def _search(seg, ts, q_seg, q_ts, side: str) -> np.ndarray:
    """Index of the first sorted item at or after (``side='left'``) each query's time."""
    uniq, inv = np.unique(np.concatenate([ts, q_ts]), return_inverse=True)
    span = len(uniq) + 1
    inv = inv.reshape(-1)
    key = seg * span + inv[: len(ts)]
    return np.searchsorted(key, q_seg * span + inv[len(ts) :], side=side)


def pre_own(
    half_lives, states: np.ndarray, hists: Mapping[int, bytes], ent, ts, label, ties: bool,
    replayed: np.ndarray | None = None, weight=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-event states of a batch's new references in their own partition's shard.

    ``states``: per entity index, the shard's state before the batch (``t`` last);
    ``hists``: the histories of entities whose ``t`` may not be older than their rows;
    ``ent``/``ts``/``label``: the references in processing (offset) order. A reference
    sees the shard (strictly earlier contributions) plus the batch's references before
    it in offset order and in time (``ties``: or at its time). ``weight``: impressions
    per reference (1 each unless given). Returns ``(pre [R, W], truncated [R])``.

    ``replayed``: :func:`features.pointintime.replay_states`'s ``pre`` of the same
    references, if at hand. For an entity whose state is older than its rows and whose
    rows are in time order (the common case) it is the answer already: for ``ties``
    as is, else that of the first reference of its run of equal times.
    """
    ent = np.asarray(ent, np.int64)
    ts = np.asarray(ts, np.float64)
    W = states.shape[1] - 1
    R = len(ent)
    wt = np.ones(R) if weight is None else np.asarray(weight, np.float64)
    if not R:
        return np.zeros((0, W)), np.zeros(0, bool)
    uniq, seg_of = np.unique(ent, return_inverse=True)
    seg_of = seg_of.reshape(-1)
    first_ts = np.full(len(uniq), np.inf)
    np.minimum.at(first_ts, seg_of, ts)
    st = states[uniq]
    fast = np.isnan(st[:, W]) | (st[:, W] < first_ts)
    # Entities whose references go back in time within the batch (a late event): their
    # references count pairwise (earlier in offset order and older), not in time order.
    by_seg = np.lexsort((np.arange(R), seg_of))
    back = np.zeros(len(uniq), bool)
    down = (np.diff(ts[by_seg]) < 0) & (seg_of[by_seg][1:] == seg_of[by_seg][:-1])
    back[seg_of[by_seg][1:][down]] = True
    pre = np.zeros((R, W))
    easy = fast & ~back if replayed is not None else np.zeros(len(uniq), bool)
    ez = easy[seg_of]
    if ez.any():
        if ties:
            pre[ez] = replayed[ez]
        else:
            s_seg, s_ts = seg_of[by_seg], ts[by_seg]
            run = np.ones(R, bool)
            run[1:] = (s_seg[1:] != s_seg[:-1]) | (s_ts[1:] != s_ts[:-1])
            first = by_seg[np.maximum.accumulate(np.where(run, np.arange(R), 0))]
            take = np.empty(R, np.int64)
            take[by_seg] = first
            pre[ez] = replayed[take[ez]]
    hard = ~easy
    items = _Items(W)
    head_t = np.where(fast, np.nan, 0.0)
    f = np.flatnonzero(fast & hard & ~np.isnan(st[:, W]))
    items.add(f, st[f, W], st[f, :W], np.full(len(f), -1.0))
    slow = np.flatnonzero(~fast)
    last_ts = np.full(len(uniq), -np.inf)
    np.maximum.at(last_ts, seg_of, ts)
    cut = np.nextafter(last_ts, np.inf) if ties else last_ts
    head_t[slow] = items.histories(slow, st[slow], [hists.get(int(uniq[s])) for s in slow],
                                   cut[slow])
    n_items = sum(len(a) for a in items.seg)
    inorder = ~back[seg_of] & ~ez
    items.events(seg_of[inorder], ts[inorder], np.asarray(label)[inorder],
                 1e12 + np.flatnonzero(inorder), wt[inorder])
    q = hard[seg_of]
    if any(len(a) for a in items.seg) and q.any():
        order, seg, sts, post = items.cumulate(half_lives, len(uniq))
        if ties:
            where = np.empty(len(order), np.int64)
            where[order] = np.arange(len(order))
            p = np.empty(R, np.int64)
            p[inorder] = where[n_items:]
            rest = q & ~inorder
            p[rest] = _search(seg, sts, seg_of[rest], ts[rest], "right")
            p = p[q]
        else:
            p = _search(seg, sts, seg_of[q], ts[q], "left")
        pre[q] = _states_at(half_lives, seg, sts, post, seg_of[q], ts[q], p)
    if back.any():
        sel = by_seg[back[seg_of[by_seg]]]  # references of such entities, offset order
        pre[sel] += _earlier_refs(half_lives, W, seg_of[sel], ts[sel],
                                  np.asarray(label, np.float64)[sel], ties, wt[sel])
    ht = head_t[seg_of]
    with np.errstate(invalid="ignore"):
        trunc = (ht > ts) if ties else (ht >= ts)
    return pre, trunc


#: References of one entity compared pairwise (above: halves, see :func:`_earlier_refs`).
_BLOCK = 64


def _earlier_refs(half_lives, W: int, seg, ts, label, ties: bool, weight=None) -> np.ndarray:
    """Per reference (grouped by segment, offset order within it): the state of its
    segment's references before it in offset order and older (``ties``: or as old),
    decayed to its time. ``weight``: impressions per reference (1 each unless given).

    Not pairwise over a whole segment (quadratic in a hot entity's references):
    offset positions are split in aligned blocks of ``_BLOCK``, pairwise within a block
    (vectorised over blocks), and above that in halves recursively (one level per bit of
    the position): every reference of a right half queries the left half's references,
    time-sorted and cumulated once. Every earlier reference is in exactly one such block
    or left half, so the parts sum to the answer in O(R (_BLOCK + log² R)).

    >>> pre = _earlier_refs((10.0,), 4, np.zeros(3, np.int64), np.array([5.0, 3.0, 4.0]),
    ...                     np.array([1.0, 0.0, 1.0]), ties=False)
    >>> pre[:, :2].tolist()   # the third (t=4) sees the second (t=3), not the first (t=5)
    [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    """
    R = len(seg)
    out = np.zeros((R, W))
    if R < 2:
        return out
    weight = np.ones(R) if weight is None else np.asarray(weight, np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
    pos = np.arange(R) - np.repeat(starts, np.diff(np.r_[starts, R]))
    # Within blocks: reference i against the k = pos % _BLOCK before it.
    k = pos % _BLOCK
    n_pairs = int(k.sum())
    if n_pairs:
        i = np.repeat(np.arange(R), k)
        j = i - 1 - (np.arange(n_pairs) - np.repeat(np.cumsum(k) - k, k))
        dt = ts[i] - ts[j]
        keep = (dt >= 0) if ties else (dt > 0)
        i, j, dt = i[keep], j[keep], dt[keep]
        out[:, 0] = np.bincount(i, weight[j], minlength=R)
        out[:, 1] = np.bincount(i, label[j], minlength=R)
        for h_j, h in enumerate(half_lives):
            w = np.exp2(-dt / h)
            out[:, 2 + 2 * h_j] = np.bincount(i, w * weight[j], minlength=R)
            out[:, 3 + 2 * h_j] = np.bincount(i, w * label[j], minlength=R)
    span = int(pos.max()) + 1
    level = _BLOCK.bit_length() - 1
    while (1 << level) < span:
        block = pos >> level
        right = (block & 1) == 1
        _, pair = np.unique(seg * span + (block >> 1), return_inverse=True)
        pair = pair.reshape(-1)
        left = ~right
        items = _Items(W)
        items.events(pair[left], ts[left], label[left], pos[left], weight[left])
        _, iseg, its, post = items.cumulate(half_lives, int(pair.max()) + 1)
        q = np.flatnonzero(right)
        p = _search(iseg, its, pair[q], ts[q], "right" if ties else "left")
        out[q] += _states_at(half_lives, iseg, its, post, pair[q], ts[q], p)
        level += 1
    return out


@compiled
def _decayed_others(hl, states, ent, ts, ties, pre, slow):
    """Per shard ``q`` and reference ``r``: the shard's state of ``ent[r]`` decayed to
    ``ts[r]`` (``t`` NaN or not older: no decay), and whether the state is too new to use
    (``slow``: ``t >= ts``, or ``t > ts`` with ``ties``). ``states`` ``[Q, K, W + 1]``."""
    W = pre.shape[2]
    for q in range(states.shape[0]):
        for r in range(len(ent)):
            e = ent[r]
            t = states[q, e, W]
            x = ts[r]
            slow[q, r] = (t > x) if ties else (t >= x)
            d = x - t
            if d != d or d < 0.0:
                d = 0.0
            pre[q, r, 0] = states[q, e, 0]
            pre[q, r, 1] = states[q, e, 1]
            for j in range(2, W):
                pre[q, r, j] = states[q, e, j] * np.exp2(-d / hl[j - 2])


@compiled
def _add_in_order(acc, rows, parts):
    """``acc[rows] += parts[q]`` for each ``q`` in order (the same sums, element by
    element, as one ``+=`` per shard)."""
    for q in range(parts.shape[0]):
        for r in range(len(rows)):
            for j in range(parts.shape[2]):
                acc[rows[r], j] += parts[q, r, j]


def pre_other(
    half_lives, states: np.ndarray, hists: Mapping[int, bytes], ent, ts, ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Each reference's state in ANOTHER partition's shard as of its time.

    ``states`` per entity index (``t`` last), ``hists`` the histories of entities whose
    ``t`` is not older than the batch's first event. Returns ``(pre [R, W], truncated [R])``.
    """
    pre, trunc = pre_others(half_lives, [states], [hists], ent, ts, ties)
    return pre[0], trunc[0]


def pre_others(
    half_lives, states: list[np.ndarray], hists: list[Mapping[int, bytes]], ent, ts, ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pre_other` for several shards at once: ``(pre [Q, R, W], truncated [Q, R])``.

    References whose shard state is older than them (the common case) take it decayed,
    in one compiled pass over every shard; the others are answered from the histories.
    """
    ent = np.ascontiguousarray(ent, np.int64)
    ts = np.ascontiguousarray(ts, np.float64)
    Q, R = len(states), len(ent)
    W = (states[0].shape[1] if Q else 1) - 1
    pre = np.empty((Q, R, W))
    slow = np.zeros((Q, R), bool)
    trunc = np.zeros((Q, R), bool)
    if not Q or not R:
        return pre, trunc
    stacked = np.ascontiguousarray(np.stack([np.asarray(s, np.float64) for s in states]))
    hl = np.repeat(np.asarray(half_lives, np.float64), 2)
    _decayed_others(hl, stacked, ent, ts, bool(ties), pre, slow)
    for k in np.flatnonzero(slow.any(axis=1)).tolist():
        _from_histories(half_lives, stacked[k], hists[k], ent, ts, ties, slow[k], pre[k],
                        trunc[k])
    return pre, trunc


def add_others(acc: np.ndarray, rows: np.ndarray, parts: np.ndarray) -> None:
    """``acc[rows] += parts[q]`` for each shard ``q`` of :func:`pre_others`, in order."""
    if parts.size:
        _add_in_order(acc, np.ascontiguousarray(rows, np.int64), parts)


def _from_histories(half_lives, states, hists, ent, ts, ties, slow, pre, trunc) -> None:
    """The references of one shard whose state is too new (``slow``): their states as of
    their times from the entities' histories, into ``pre`` / ``trunc`` (in place)."""
    W = states.shape[1] - 1
    q = np.flatnonzero(slow)
    uniq, seg_of = np.unique(ent[q], return_inverse=True)
    seg_of = seg_of.reshape(-1)
    items = _Items(W)
    last_ts = np.full(len(uniq), -np.inf)
    np.maximum.at(last_ts, seg_of, ts[q])
    head_t = items.histories(np.arange(len(uniq)), states[uniq],
                             [hists.get(e) for e in uniq.tolist()],
                             np.nextafter(last_ts, np.inf) if ties else last_ts)
    if not items.seg:
        pre[q] = 0.0
    else:
        _, seg, sts, post = items.cumulate(half_lives, len(uniq))
        p = _search(seg, sts, seg_of, ts[q], "right" if ties else "left")
        pre[q] = _states_at(half_lives, seg, sts, post, seg_of, ts[q], p)
    with np.errstate(invalid="ignore"):
        trunc[q] = (head_t[seg_of] > ts[q]) if ties else (head_t[seg_of] >= ts[q])


def warm() -> None:
    """Compile the point-in-time loops, or load them from numba's cache, now: the worker
    calls this as it starts, so its first batch does not wait for them (~0.5 s)."""
    replay_states((1.0,), np.zeros((1, 5)), np.zeros(1, np.int64), np.zeros(1), np.zeros(1))
    pre, _ = pre_others((1.0,), [np.zeros((1, 5))], [{}], np.zeros(1, np.int64), np.zeros(1),
                        ties=False)
    add_others(np.zeros((1, 4)), np.zeros(1, np.int64), pre)
