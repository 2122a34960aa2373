"""QARM item alignment online: pairs mined from the click stream, a projection per refresh.

QARM's alignment (docs/protocol.md) fine-tunes a projection of the content embedding so
that items users click together land close together. In the running stack
(``HEADWATER_ALIGN_ONLINE=1``) it has two halves:

- **Click side** (:class:`ClickPairs`, every worker): each click batch, once applied,
  feeds the click agent's :class:`features.alignment.PairMiner` (for each click, the
  most similar item among the same user's last ``HEADWATER_ALIGN_WINDOW`` clicks is its
  trigger); the mined ``<trigger, target>`` ids go to a capped Redis list beside the
  codebooks (``features.codebook_store``). Users are partitioned by key, so one worker
  sees all of a user's clicks; its windows live in the worker's memory (a restarted
  worker starts them empty: no pair across a restart, none invented).
- **Refresh side** (:func:`train_projection`, the lease holder): a scheduled codebook
  refresh first trains the alignment tower (``learner.multimodal.AlignmentTower``) on the
  stored pairs, starting from the projection of the current version and pulled back
  towards it (``HEADWATER_ALIGN_DECAY``), then re-fits the codebooks through the stable
  refresh path: centroids matched to the old ones, only items whose codes moved are
  rewritten. The projection is stored in the codebook version it coded (versioned by
  its hash in the code version string), so it lives as long as that version and a
  restarted worker quantizes with it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from core.settings import Settings
from features.alignment import PairMiner
from features.codebook_store import CodebookStore

log = logging.getLogger(__name__)

__all__ = ["ClickPairs", "pair_arrays", "train_projection"]


class ClickPairs:
    """Mine ``<trigger, target>`` pairs from applied click batches into Redis.

    Content comes from the shared content hash (``CodebookStore.content_of``) through a
    bounded local cache (``cache_items``, least recently used evicted); an item whose
    content has not arrived yet neither triggers nor gets a trigger.
    """

    def __init__(self, codebooks: CodebookStore, window: int, keep: int,
                 max_users: int = 100_000, cache_items: int = 100_000) -> None:
        self.codebooks = codebooks
        self.keep = keep
        self.cache_items = cache_items
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._dim = 0
        # The pairs go to Redis: the miner's own buffer keeps none.
        self.miner = PairMiner(self._embed, window=window, max_users=max_users, max_pairs=0)

    def _embed(self, ids: Sequence[Hashable]) -> np.ndarray:
        out = np.zeros((len(ids), self._dim), np.float32)
        for row, item in enumerate(ids):
            vec = self._cache.get(str(item))
            if vec is not None:
                out[row] = vec
        return out

    async def observe(self, cols: Mapping[str, Any]) -> int:
        """Mine the clicks (label 1) of a batch in stream order; returns pairs stored."""
        labels = np.asarray(cols["label"])
        clicked = np.flatnonzero(labels == 1)
        if not len(clicked):
            return 0
        users = [str(cols["user_id"][i]) for i in clicked]
        items = [str(cols["item_id"][i]) for i in clicked]
        want = set(items)
        for user in set(users):
            want.update(str(i) for i in self.miner.recent(user))
        missing = sorted(i for i in want if i not in self._cache)
        fetched = await self.codebooks.content_of(missing)
        for item, vec in fetched.items():
            self._cache[item] = vec
            self._dim = len(vec)
        for item in want:
            if item in self._cache:
                self._cache.move_to_end(item)
        while len(self._cache) > self.cache_items:
            self._cache.popitem(last=False)
        if not self._dim:
            return 0  # no content stored yet: nothing can pair
        pairs = self.miner.observe(users, items)
        await self.codebooks.push_pairs([(p.trigger, p.target) for p in pairs], self.keep)
        return len(pairs)


def pair_arrays(pairs: Sequence[tuple[str, str]], ids: Sequence[str], content: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(trigger content, target content, target ids)`` of the pairs whose two items
    have content; target ids number distinct targets (repeats are not negatives).

    >>> c = np.eye(3, dtype=np.float32)
    >>> trig, tgt, tid = pair_arrays([("a", "b"), ("a", "x"), ("c", "b")], ["a", "b", "c"], c)
    >>> trig.argmax(1).tolist(), tgt.argmax(1).tolist(), tid.tolist()
    ([0, 2], [1, 1], [0, 0])
    """
    row = {str(i): r for r, i in enumerate(ids)}
    kept = [(row[a], row[b]) for a, b in pairs if a in row and b in row]
    if not kept:
        dim = content.shape[1] if content.ndim == 2 else 0
        empty = np.zeros((0, dim), np.float32)
        return empty, empty, np.zeros(0, np.int64)
    trig, tgt = (np.asarray(x, np.int64) for x in zip(*kept, strict=True))
    _, tid = np.unique(tgt, return_inverse=True)
    return content[trig], content[tgt], tid.astype(np.int64)


def train_projection(current: Mapping[str, np.ndarray] | None, trigger: np.ndarray,
                     target: np.ndarray, target_ids: np.ndarray, settings: Settings,
                     seed: int = 0) -> tuple[dict[str, np.ndarray], float]:
    """Train the alignment tower on pairs, from ``current`` (``None``: identity); returns
    the new ``{"weight", "bias"}`` and the last epoch's mean loss."""
    import torch

    from learner.multimodal import AlignmentTower

    dim = trigger.shape[1]
    tower = AlignmentTower(dim, temperature=settings.align_temperature)
    if current is not None:
        with torch.no_grad():
            tower.linear.weight.copy_(torch.as_tensor(np.asarray(current["weight"], np.float32)))
            tower.linear.bias.copy_(torch.as_tensor(np.asarray(current["bias"], np.float32)))
    history = tower.fit(trigger, target, target_ids=target_ids, epochs=settings.align_epochs,
                        batch_size=512, lr=settings.align_lr,
                        weight_decay=settings.align_decay, seed=seed)
    return tower.export_numpy(), history[-1]
