"""The row builder every process derives from the settings: one place, so the worker's
training rows and serving's scoring rows always have the same feature schema."""

from __future__ import annotations

from features.rows import RowBuilder, RowConfig


def code_field_names(levels: int, vq_k: int) -> tuple[str, ...]:
    """``rq0..rq{L-1}`` then ``vq0..vq{k-1}``: the categorical fields of item codes."""
    return tuple(f"rq{i}" for i in range(levels)) + tuple(f"vq{j}" for j in range(vq_k))


def row_builder(settings) -> RowBuilder:
    """The :class:`RowBuilder` for a :class:`core.settings.Settings`."""
    return RowBuilder(RowConfig(code_fields=code_field_names(settings.code_levels, settings.vq_k)))
