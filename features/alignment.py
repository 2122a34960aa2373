"""QARM item-alignment pair mining from the click stream, online and bounded.

For every click on a target item, the trigger is the item most similar (cosine of
content embeddings) to the target among the same user's recent clicks, within a
window of the last ``window`` clicks. ``<trigger, target>`` is a positive pair for
the alignment tower's in-batch contrastive loss (``learner.multimodal``): items a user
clicks together should land close together, which the pre-trained text model alone
does not know.

State is bounded on purpose: each user keeps at most ``window`` recent clicks, at
most ``max_users`` users are kept (least recently active evicted first) and the pair
buffer holds the most recent ``max_pairs`` pairs. The miner only ever sees clicks in
stream order, so pairs (and any projection trained on them) never look ahead.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Pair", "PairMiner"]

EmbedFn = Callable[[Sequence[Hashable]], np.ndarray]


@dataclass(frozen=True)
class Pair:
    """A mined positive pair and the cosine similarity that chose the trigger."""

    trigger: Hashable
    target: Hashable
    similarity: float


class PairMiner:
    """Mine ``<trigger, target>`` pairs from clicks, one user window at a time.

    Parameters
    ----------
    embed
        Maps item ids to ``(n, d)`` content embeddings (need not be normalised); rows
        of all zeros mean "unknown item", which neither triggers nor gets a trigger.
    window
        Recent clicks kept per user (the candidates for a trigger).
    max_users
        Users kept; the least recently active is evicted beyond it.
    max_pairs
        Most recent pairs kept in :attr:`pairs` for training.
    min_similarity
        Pairs whose best similarity is below it are dropped (``None`` keeps all).

    >>> vecs = {1: [1.0, 0.0], 2: [0.0, 1.0], 3: [0.9, 0.1]}
    >>> miner = PairMiner(lambda ids: np.array([vecs[i] for i in ids]), window=5)
    >>> [(p.trigger, p.target) for p in miner.observe(["u", "u", "u"], [1, 2, 3])]
    [(1, 2), (1, 3)]
    """

    def __init__(
        self,
        embed: EmbedFn,
        window: int = 20,
        max_users: int = 100_000,
        max_pairs: int = 50_000,
        min_similarity: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.embed = embed
        self.window = window
        self.max_users = max_users
        self.min_similarity = min_similarity
        self._recent: OrderedDict[Hashable, deque[Hashable]] = OrderedDict()
        self.pairs: deque[Pair] = deque(maxlen=max_pairs)
        self.n_pairs_total = 0
        self.n_clicks_total = 0

    def __len__(self) -> int:
        """Number of users currently tracked."""
        return len(self._recent)

    def recent(self, user_id: Hashable) -> list[Hashable]:
        """The user's window of recent clicked items, oldest first."""
        return list(self._recent.get(user_id, ()))

    def observe(
        self,
        user_ids: Sequence[Hashable],
        item_ids: Sequence[Hashable],
        labels: Sequence[int] | None = None,
    ) -> list[Pair]:
        """Feed a batch of events in stream order; return the pairs mined from it.

        Only events with label 1 (default: all) are clicks. Each click is first paired
        with the user's window as it was *before* the click, then joins the window.
        """
        if labels is None:
            clicks = list(range(len(item_ids)))
        else:
            clicks = [i for i, lab in enumerate(labels) if int(lab) == 1]
        if not clicks:
            return []
        # One embedding lookup for every item the batch can touch: targets plus windows.
        needed: dict[Hashable, int] = {}
        for i in clicks:
            needed.setdefault(item_ids[i], len(needed))
            for past in self._recent.get(user_ids[i], ()):
                needed.setdefault(past, len(needed))
        vecs = np.asarray(self.embed(list(needed)), dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1)
        unit = vecs / np.maximum(norms, 1e-12)[:, None]
        known = norms > 0

        mined: list[Pair] = []
        for i in clicks:
            user, target = user_ids[i], item_ids[i]
            self.n_clicks_total += 1
            win = self._recent.get(user)
            if win is None:
                win = deque(maxlen=self.window)
                self._recent[user] = win
                while len(self._recent) > self.max_users:
                    self._recent.popitem(last=False)
            else:
                self._recent.move_to_end(user)
            t = needed[target]
            if known[t] and win:
                cands = [c for c in win if c != target and known[needed[c]]]
                if cands:
                    sims = unit[[needed[c] for c in cands]] @ unit[t]
                    best = int(np.argmax(sims))
                    sim = float(sims[best])
                    if self.min_similarity is None or sim >= self.min_similarity:
                        mined.append(Pair(cands[best], target, sim))
            if target in win:  # a re-click refreshes recency instead of duplicating
                win.remove(target)
            win.append(target)
        self.pairs.extend(mined)
        self.n_pairs_total += len(mined)
        return mined

    def pair_ids(self) -> tuple[list[Hashable], list[Hashable]]:
        """Buffered pairs as ``(triggers, targets)`` id lists, oldest first."""
        return [p.trigger for p in self.pairs], [p.target for p in self.pairs]
