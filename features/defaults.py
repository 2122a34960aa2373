"""What every process derives from the settings: the feature definition and the row
builder, in one place, so the worker's training rows, serving's scoring rows and the
store's counters always follow the same definition."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from features.definition import FeatureDefinition, load
from features.rows import RowBuilder


def code_field_names(levels: int, vq_k: int) -> tuple[str, ...]:
    """``rq0..rq{L-1}`` then ``vq0..vq{k-1}``: the categorical fields of item codes.

    >>> code_field_names(2, 1)
    ('rq0', 'rq1', 'vq0')
    """
    return tuple(f"rq{i}" for i in range(levels)) + tuple(f"vq{j}" for j in range(vq_k))


@lru_cache(maxsize=8)
def _load(path: str | None) -> FeatureDefinition:
    return load(path)


def definition(settings) -> FeatureDefinition:
    """The feature definition ``HEADWATER_FEATURES`` names (default: MovieLens)."""
    return _load(str(settings.features) if settings.features else None)


def row_builder(settings) -> RowBuilder:
    """The :class:`RowBuilder` for a :class:`core.settings.Settings`."""
    config = definition(settings).row_config(code_field_names(settings.code_levels, settings.vq_k))
    if settings.seq_len:
        config = dataclasses.replace(config, seq_len=settings.seq_len)
    return RowBuilder(config)
