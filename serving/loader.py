"""How a published version becomes a :class:`~serving.models.ServedModel`, or is refused.

Split from :mod:`serving.holder` (which keeps the version states and the swaps): the
manifest and feature-schema hash, sha256 and ``torch.load(weights_only=True)`` through
the :class:`~learner.store.ModelStore`, the rebuild from the manifest's config, then the
checks — every parameter finite, a warm-up batch whose outputs are finite
probabilities, and optionally a quality gate against the serving model's publication
metrics. Every refusal is a :class:`~serving.models.LoadFailure` with a reason label.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from features.schema import FeatureSchema
from learner.store import (
    CheckpointError,
    ModelStore,
    checkpoint_weights,
    manifest_kind,
    patch_model,
    rebuild_model,
)
from serving.models import LoadFailure, ServedModel
from serving.traced import TracedForwards

__all__ = ["ModelLoader"]

log = logging.getLogger(__name__)


class ModelLoader:
    """Verify, load, rebuild and check versions of one model; no state of its own.

    ``quality_margin`` ``None`` turns the quality gate off; missing or non-finite
    metrics pass it. ``warmup_rows`` is the size of the warm-up batch (random tokens
    and a cold-start row of zeros).
    """

    def __init__(
        self,
        store: ModelStore,
        schema: FeatureSchema,
        *,
        quality_metric: str = "auc",
        quality_margin: float | None = None,
        warmup_rows: int = 16,
        item_content: Any = None,
        traced: TracedForwards | None = None,
    ) -> None:
        #: traced forwards shared by every version (serving/traced.py; ``None``: all eager)
        self.traced = traced
        #: ``learner.em3.ItemContentTable`` for models with EM3 fields (``None``: none served)
        self.item_content = item_content
        self.store = store
        self.schema = schema
        self.quality_metric = quality_metric
        self.quality_margin = quality_margin
        self.warmup_rows = warmup_rows

    def load(
        self,
        version: str,
        serving: ServedModel | None = None,
        base_of: Callable[[str], ServedModel | None] | None = None,
    ) -> ServedModel:
        """Verify, load, rebuild and check one version; raise :class:`LoadFailure`.

        ``serving`` is the model it would replace (the quality gate's reference).
        A delta is applied to its base full checkpoint, which
        ``base_of(base_version)`` returns loaded, by patching a copy of the base's model
        that shares every tensor the delta leaves alone (copy on write) (``None``: not loadable); the base's
        sha256 must be the delta's ``base_sha256``, else the delta is refused
        (reason ``base``): it was computed against another model.
        """
        store = self.store
        try:
            manifest = store.manifest(version)
        except CheckpointError as exc:
            raise LoadFailure("manifest", str(exc)) from None
        expected = self.schema.hash
        if manifest.get("feature_schema_hash") != expected:
            raise LoadFailure(
                "schema",
                f"feature schema hash {str(manifest.get('feature_schema_hash'))[:12]}… differs from "
                f"the rows this server builds ({expected[:12]}…): the model was trained on another "
                "feature schema",
            )
        try:
            ck = store.load(version, expected_schema_hash=expected)  # sha256 + weights_only
        except CheckpointError as exc:
            msg = str(exc)
            raise LoadFailure(
                "checksum" if ("sha256" in msg or "bytes" in msg) else "load", msg
            ) from None
        base = model = None
        patched = False
        try:
            if manifest_kind(ck.manifest) == "delta":
                base = self._base(ck.manifest, base_of)
                model = self._patch(base, ck)
                patched = model is not None
                if model is None:  # what patching does not cover: rebuild base + delta
                    weights = store.assemble(base.model.state_dict(), ck)
            else:
                weights = checkpoint_weights(ck.state)
        except CheckpointError as exc:
            raise LoadFailure("base", str(exc)) from None
        except KeyError as exc:
            raise LoadFailure("load", f"no model weights in the checkpoint: {exc}") from None
        if model is None:
            try:
                model = rebuild_model(ck.manifest["config"], weights)
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                raise LoadFailure("load", f"weights do not fit the manifest config: {exc}") from None
        em3 = getattr(model, "em3", None)
        if em3 is not None:  # items' multimodal fields: computed once for this version
            if self.item_content is None:
                raise LoadFailure("load", "the model has EM3 fields but serving reads no item "
                                          "content (HEADWATER_EM3_QUERIES is 0 here)")
            em3.attach(self.item_content)
            em3.freeze()
        spec = getattr(model, "spec", None)
        if spec is not None and (
            list(spec.categorical) != self.schema.categorical
            or list(spec.dense) != self.schema.dense
        ):
            raise LoadFailure("schema", "the model's input fields differ from the feature schema")
        served = ServedModel(
            version, model, ck.manifest, len(self.schema.categorical), len(self.schema.dense),
            base=base, patched=patched,
        )
        warmup = self.sanity(served)
        served = self._with_traced(served, *warmup)
        self.quality_gate(served, serving)
        return served

    def _with_traced(self, served: ServedModel, cat: np.ndarray, dense: np.ndarray,
                     probs: np.ndarray) -> ServedModel:
        """``served`` with its traced forward, if there is one and it gives every warm-up
        score bit for bit as the eager forward did; else ``served`` as it is (eager)."""
        if self.traced is None:
            return served
        model = served.model
        forward = self.traced.forward_for(model, *model.inputs(cat, dense))
        if forward is None:
            return served
        traced = dataclasses.replace(served, forward=forward)
        try:
            same = np.array_equal(traced.predict(cat, dense), probs)
        except Exception as exc:  # noqa: BLE001 - the eager forward serves instead
            log.warning("version %s: the traced forward failed on the warm-up batch (%r); "
                        "it runs eagerly", served.version, exc)
            return served
        if not same:
            self.traced.mismatches += 1
            log.warning("version %s: the traced forward differs from the eager one on the "
                        "warm-up batch; it runs eagerly", served.version)
            return served
        return traced

    def _base(
        self, manifest: dict[str, Any], base_of: Callable[[str], ServedModel | None] | None
    ) -> ServedModel:
        """The loaded base full checkpoint of a delta, checked against ``base_sha256``."""
        base_version = str(manifest.get("base"))
        base = base_of(base_version) if base_of is not None else None
        if base is None or manifest_kind(base.manifest) != "full":
            raise CheckpointError(
                f"{self.store.model} version {manifest['version']}: delta on base "
                f"{base_version}, which is not loadable here"
            )
        self.store.check_base(manifest, base.manifest)
        return base

    def _patch(self, base: ServedModel, ck: Any) -> torch.nn.Module | None:
        """The delta ``ck`` patched onto ``base``'s loaded model (no rebuild), or ``None``
        when only a rebuild applies it (:func:`learner.store.patch_model`; EM3 models,
        whose item content is attached per version, are always rebuilt)."""
        if getattr(base.model, "em3", None) is not None:
            return None
        try:
            return patch_model(base.model, ck.state["delta"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.store.model} version {ck.manifest['version']}: delta does not apply to "
                f"base {base.version}: {exc!r}"
            ) from None

    def sanity(self, served: ServedModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Finite parameters, and a warm-up batch of finite probabilities of the right shape;
        returns the batch (tokens, dense) and its probabilities.

        A patched delta's tensors shared with its base were checked when the base
        loaded: only the ones the delta replaced are checked again."""
        tensors = served.model.state_dict().items()
        if served.patched and served.base is not None:
            base = served.base.model
            shared = {id(t) for t in itertools.chain(base.parameters(), base.buffers())}
            tensors = [(n, t) for n, t in itertools.chain(served.model.named_parameters(),
                                                          served.model.named_buffers())
                       if id(t) not in shared]
        for name, p in tensors:
            if torch.is_tensor(p) and p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise LoadFailure("sanity", f"parameter {name!r} holds NaN or infinite values")
        rng = np.random.default_rng(int(served.version))
        n, f, d = max(2, self.warmup_rows), served.n_categorical, served.n_dense
        cat = rng.integers(1, 2**62, size=(n, f), dtype=np.int64)
        cat[0] = 0  # the cold-start row: every field missing
        dense = rng.uniform(0.0, 5.0, size=(n, d)).astype(np.float32)
        dense[0] = 0.0
        try:
            probs = served.predict(cat, dense)
        except Exception as exc:  # noqa: BLE001 - any failure here means "do not serve"
            raise LoadFailure("sanity", f"warm-up batch failed: {exc!r}") from None
        if probs.shape != (n,):
            raise LoadFailure("sanity", f"warm-up output has shape {probs.shape}, expected ({n},)")
        if not np.isfinite(probs).all():
            raise LoadFailure("sanity", "warm-up batch produced NaN or infinite scores")
        if (probs < 0).any() or (probs > 1).any():
            raise LoadFailure("sanity", "warm-up batch produced scores outside [0, 1]")
        return cat, dense, probs

    def quality_gate(self, served: ServedModel, serving: ServedModel | None) -> None:
        """Refuse ``served`` if its metric is below ``serving``'s by more than the margin."""
        if self.quality_margin is None or serving is None:
            return
        new = (served.manifest.get("metrics") or {}).get(self.quality_metric)
        old = (serving.manifest.get("metrics") or {}).get(self.quality_metric)
        if not isinstance(new, (int, float)) or not isinstance(old, (int, float)):
            return
        if not (math.isfinite(new) and math.isfinite(old)):
            return
        if new < old - self.quality_margin:
            raise LoadFailure(
                "quality",
                f"quality gate: {self.quality_metric} {new:.4f} is below the serving version "
                f"{serving.version}'s {old:.4f} by more than {self.quality_margin}",
            )
