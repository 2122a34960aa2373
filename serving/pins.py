"""The serving pin: which version serves regardless of newer ones, kept in the model store.

Split from :mod:`serving.holder`. The pin lives in the store's ``pins.json`` (so it
survives restarts and protects the version from retention); serving keeps at most one.
"""

from __future__ import annotations

from learner.store import CheckpointError, ModelStore
from serving.models import HolderError

__all__ = ["ServingPin"]


class ServingPin:
    """Read and write the one serving pin of a model in its store."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def read(self) -> str | None:
        """The pinned version (the newest pin if several), or ``None``.

        Raises :class:`~learner.store.CheckpointError` for an unreadable ``pins.json``.
        """
        pins = self.store.pins()
        return pins[-1] if pins else None

    def write(self, version: str | None) -> None:
        """Make ``version`` the only pin (``None``: no pin); HTTP 500 if the store refuses."""
        try:
            for v in self.store.pins():
                if v != version:
                    self.store.unpin(v)
            if version is not None:
                self.store.pin(version)
        except (CheckpointError, OSError) as exc:
            raise HolderError(500, f"could not write the pin to the model store: {exc}") from None
