"""Training rows of applied click events, encoded as Arrow messages for ``train-batches``."""

from __future__ import annotations

import numpy as np

from features.rows import RowBuilder
from features.store_core import BatchResult
from learner.batch import encode_batches
from streams.events import Output

__all__ = ["RowEncoder"]


class RowEncoder:
    """Rows from the events' pre-event features (the shared :class:`RowBuilder`), as Arrow
    IPC messages of at most ``rows_per_message`` rows, keyed by the source partition and
    carrying its offset range."""

    def __init__(self, builder: RowBuilder, topic: str, rows_per_message: int) -> None:
        if rows_per_message < 1:
            raise ValueError(f"rows_per_message must be >= 1, got {rows_per_message}")
        self.builder = builder
        self.topic = topic
        self.rows_per_message = rows_per_message

    def outputs(self, columns: dict, result: BatchResult, source_topic: str,
                partition: int) -> tuple[list[Output], int]:
        """The messages for the rows of the events ``result`` marks valid, and the row count."""
        keep = np.asarray(result.valid, bool)
        if not keep.any():
            return [], 0
        rows = self.builder.build(columns, result.features, result.item_attrs, result.codes,
                                  result.sequences)
        if not keep.all():
            rows = {name: col[keep] for name, col in rows.items()}
        return self.encode(rows, source_topic, partition), int(keep.sum())

    def encode(self, rows: dict, source_topic: str, partition: int) -> list[Output]:
        schema_json, schema_hash = self.builder.schema.to_json(), self.builder.schema.hash
        key = str(partition).encode()
        return [(self.topic, key, payload, None) for payload, _ in
                encode_batches(rows, schema_json, schema_hash, source_topic, partition,
                               self.rows_per_message)]
