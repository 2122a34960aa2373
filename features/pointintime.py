"""Point-in-time counter states of a batch, computed in numpy from the states it starts from.

Given each entity's stored state (``n``, ``c``, decayed sums, and ``t``, the time they are
decayed to) and the batch's references in processing order, :func:`replay_states`
returns every reference's state just *before* its event and every entity's state after
the batch, with the exact semantics of applying the events one by one:

- totals add ``weight`` (the event's impressions: 1 unless given) and ``label``;
- an event at ``ts >= t`` decays the sums to ``ts`` first, then adds, and ``t := ts``;
- a late event (``ts < t``) adds with weight ``2 ** (-(t - ts) / h)``; ``t`` stays.

Why it vectorises: decay is linear, so with ``T_r`` the running maximum of event times
(the time the state is kept at after reference ``r``), the state before ``r`` is
``sum over earlier refs r' of x_r' * 2 ** (-(T_r - ts_r') / h)`` (the stored state is a
pseudo-reference at its ``t``). Per entity that is a prefix sum of ``x * 2 ** ((ts - B) / h)``
scaled by ``2 ** (-(T - B) / h)``. The base ``B`` moves in blocks of ``_SPAN`` half-lives
so the scaled terms stay far from overflow; a carry links an entity's blocks. Prefix sums
are segmented scans that never add across entities (no cancellation between a hot and a
cold entity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Replayed", "replay_states"]

#: Half-lives per block of the decay base: 2**600 is far inside float64's range.
_SPAN = 600.0


@dataclass
class Replayed:
    """Result of :func:`replay_states` (arrays follow the input reference order)."""

    pre: np.ndarray  # [R, width] state before each reference, decayed to its T
    late: np.ndarray  # [R] bool: the reference's event was older than the entity's t
    touched: np.ndarray  # [U] entity indices written by the batch, ascending
    final: np.ndarray  # [U, width + 1] their states after the batch, ``t`` last


def _segmented_cumsum(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Inclusive prefix sums of rows of ``x`` within segments (``first[i]``: segment start).

    Log-step (Hillis–Steele) scan: ``ceil(log2(longest segment))`` vectorised passes.
    """
    y = np.array(x, dtype=np.float64, copy=True)
    idx = np.arange(len(y))
    span = int((idx - first).max(initial=0)) + 1
    d = 1
    while d < span:
        ok = (idx[d:] - d) >= first[d:]
        y[d:] = y[d:] + np.where(ok[:, None], y[:-d], 0.0)
        d *= 2
    return y


def _segmented_runmax_ts(ts: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Running maximum of ``ts`` within segments (``seg`` non-decreasing), exactly."""
    uniq, rank = np.unique(ts, return_inverse=True)
    width = len(uniq) + 1
    key = seg.astype(np.int64) * width + rank.reshape(-1)
    return uniq[np.maximum.accumulate(key) - seg.astype(np.int64) * width]


def replay_states(
    half_lives: tuple[float, ...],
    init: np.ndarray,
    entity: np.ndarray,
    ts: np.ndarray,
    label: np.ndarray | None,
    values: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> Replayed:
    """Apply references (``entity``, ``ts``, ``label``, in processing order) to states.

    ``init`` is ``[K, width + 1]`` per entity index (``t`` NaN: never written).
    ``values`` (``[R, width]``), when given, replaces what each reference adds (``1`` and
    ``label`` everywhere): a reference may then be a whole aggregated state. ``weight``
    (``[R]``), when given, replaces the ``1``: impressions the reference adds (0: a click
    counted on its own, at its own time).

    >>> init = np.array([[0.0, 0, 0, 0, np.nan]])
    >>> r = replay_states((100.0,), init, np.array([0, 0, 0]), np.array([0.0, 100.0, 50.0]),
    ...                   np.array([1, 0, 1]))
    >>> r.pre[:, :3].tolist(), r.late.tolist()
    ([[0.0, 0.0, 0.0], [1.0, 1.0, 0.5], [2.0, 1.0, 1.5]], [False, False, True])
    >>> r.final.tolist()
    [[3.0, 2.0, 2.2071067811865475, 1.2071067811865475, 100.0]]
    """
    H = len(half_lives)
    W = 2 + 2 * H
    R = len(entity)
    order = np.argsort(entity, kind="stable")
    ent_s = entity[order]
    touched, starts, counts = np.unique(ent_s, return_index=True, return_counts=True)
    U = len(touched)
    if R == 0:
        return Replayed(np.zeros((0, W)), np.zeros(0, bool), touched, np.zeros((0, W + 1)))
    # Combined layout: per touched entity, its stored state (a pseudo-reference) then its
    # references in processing order.
    seg_real = np.repeat(np.arange(U), counts)
    pos_real = np.arange(R) + seg_real + 1
    pos_init = starts + np.arange(U)
    M = R + U
    seg = np.empty(M, np.int64)
    seg[pos_real], seg[pos_init] = seg_real, np.arange(U)
    s0 = init[touched]
    t0 = s0[:, W]
    ts_real = np.asarray(ts, np.float64)[order]
    t_comb = np.empty(M)
    t_comb[pos_real] = ts_real
    t_comb[pos_init] = np.where(np.isnan(t0), ts_real[starts], t0)
    x = np.empty((M, W))
    x[pos_init] = np.nan_to_num(s0[:, :W])
    if values is not None:
        x[pos_real] = np.asarray(values, np.float64)[order]
    else:
        lab = np.asarray(label, np.float64)[order]
        x[pos_real, 0::2] = 1.0 if weight is None else np.asarray(weight, np.float64)[order][:, None]
        x[pos_real, 1::2] = lab[:, None]
    T = _segmented_runmax_ts(t_comb, seg)
    late_s = ts_real < T[pos_real - 1]

    # Totals: exact integer-valued prefix sums.
    tot = np.cumsum(x[:, :2], axis=0)
    tot -= (tot - x[:, :2])[pos_init][seg]
    pre_s = np.empty((R, W))
    pre_s[:, :2] = tot[pos_real - 1]
    final = np.empty((U, W + 1))
    last = pos_init + counts
    final[:, :2] = tot[last]
    final[:, W] = T[last]

    # Decayed sums: blocks of _SPAN shortest half-lives keep 2**((ts - B) / h) finite.
    step = _SPAN * min(half_lives)
    t_first = T[pos_init][seg]
    blk = np.floor((T - t_first) / step)
    base = t_first + blk * step
    newgrp = np.ones(M, bool)
    newgrp[1:] = (seg[1:] != seg[:-1]) | (blk[1:] != blk[:-1])
    gstart = np.flatnonzero(newgrp)
    gid = np.cumsum(newgrp) - 1
    gfirst = gstart[gid]
    hl = np.repeat(np.asarray(half_lives, np.float64), 2)
    w = x[:, 2:] * np.exp2((t_comb - base)[:, None] / hl)
    incl = _segmented_cumsum(w, gfirst)
    excl = np.where((np.arange(M) > gfirst)[:, None], np.roll(incl, 1, axis=0), 0.0)
    # Carry into later blocks of the same entity: the earlier blocks' sums at the new base.
    G = len(gstart)
    carry = np.zeros((G, 2 * H))
    gend = np.append(gstart[1:], M) - 1
    gseg = seg[gstart]
    rank = gid - gid[pos_init][seg]  # block rank of each element within its entity
    grank = rank[gstart]
    for k in range(1, int(grank.max(initial=0)) + 1):
        g = np.flatnonzero(grank == k)
        prev = g - 1  # the entity's previous block (groups are contiguous per entity)
        assert (gseg[prev] == gseg[g]).all()
        shift = np.exp2(-((base[gstart[g]] - base[gstart[prev]])[:, None]) / hl)
        carry[g] = (carry[prev] + incl[gend[prev]]) * shift
    scale = np.exp2(-((T - base)[:, None]) / hl)
    pre_s[:, 2:] = (scale * (carry[gid] + excl))[pos_real]
    final[:, 2:W] = (scale * (carry[gid] + incl))[last]

    pre = np.empty_like(pre_s)
    pre[order] = pre_s
    late = np.empty(R, bool)
    late[order] = late_s
    return Replayed(pre, late, touched, final)
