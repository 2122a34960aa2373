"""Open the model store a setting names: a directory or S3-compatible object storage."""

from __future__ import annotations

from core.settings import Settings, is_object_store
from learner.store import LocalModelStore, ModelStore

__all__ = ["open_model_store"]


def open_model_store(
    settings: Settings, *, model: str | None = None, keep: int | None = None
) -> ModelStore:
    """The model store ``settings.model_store`` names: a directory or ``s3://bucket/prefix``.

    >>> import tempfile
    >>> open_model_store(Settings(model_store=tempfile.mkdtemp())).model
    'ranker'
    """
    model = model or settings.model_name
    keep = settings.keep_versions if keep is None else keep
    if is_object_store(settings.model_store):
        from learner.store_s3 import ObjectModelStore

        return ObjectModelStore.from_settings(settings, model=model, keep=keep)
    return LocalModelStore(settings.model_store, model, keep=keep)
