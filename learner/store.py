"""The model store: versioned checkpoints + manifests (docs/contracts.md).

:class:`ModelStore` is the seam (a protocol); two implementations keep the same promises
and run the same contract suite (``tests/learner/test_store_contract.py``):

- :class:`LocalModelStore`, a directory: ``<root>/<model>/<version>/{model.pt,manifest.json}``
  and ``<root>/<model>/pins.json``. A version is written under a temporary name,
  fsynced, then renamed, so it becomes visible at once.
- :class:`learner.store_s3.ObjectModelStore`, S3-compatible object storage (``s3://``):
  the weights object first, the manifest last, so a version is visible exactly when its
  manifest exists (object writes are atomic, listings strongly consistent).

A version is a full checkpoint (``"kind": "full"``, or no ``kind``) or a **delta**
(``"kind": "delta"``, ``"base"``, ``"base_sha256"``): what changed since its base full
checkpoint — cumulative, never chained — as written by :func:`compute_delta` and
applied by :func:`apply_delta`. Deltas hold no optimizer or trainer state; the learner
resumes and :meth:`VersionedStore.latest_good` answers from full checkpoints only.

Both verify size and sha256 against the manifest before loading, and load with
``torch.load(weights_only=True)``: the model is rebuilt from the manifest's config
(never from pickled objects). The learner service writes ``model.pt`` as
``{"model": state_dict, "optimizer": ..., "trainer": {watermarks, counters, metrics},
"consumer_positions": {...}}``; serving needs only ``"model"``; a delta's file is
``{"delta": {"dense": {...}, "rows": {...}}}``. Retention keeps the newest ``keep`` full
checkpoints, the deltas of the newest full one, every pinned version (and a pinned
delta's base), and never deletes the newest version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import torch

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "LocalModelStore",
    "ModelStore",
    "StoreUnavailable",
    "VersionedStore",
    "apply_delta",
    "compute_delta",
    "manifest_kind",
    "patch_model",
]

_VERSION_RE = re.compile(r"^\d{6,}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9._-]+\.pt$")
WEIGHTS_FILE = "model.pt"
_MANIFEST_KEYS = (
    "model",
    "version",
    "created_at",
    "feature_schema_hash",
    "feature_schema",
    "sha256",
    "bytes",
    "rows_trained",
    "watermarks",
    "metrics",
    "config",
    "parent",
)

ManifestBuilder = Callable[[str, int, str], dict[str, Any]]
"""``(sha256, size, weights file name) -> manifest`` of the version being written."""


class CheckpointError(Exception):
    """A checkpoint that must not be used; the message names the version and the problem."""


class StoreUnavailable(OSError):
    """The store cannot be reached right now (network, credentials, bucket): retry later.

    Never a verdict on a version: serving does not mark a version FAILED for it.
    """


@dataclass(frozen=True)
class LoadedCheckpoint:
    manifest: dict[str, Any]
    state: dict[str, Any]
    location: str


def sha256_stream(fh: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def checkpoint_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The model's ``state_dict`` inside a checkpoint, wherever the learner nests it."""
    for path in (("model",), ("learner", "model"), ("trainer", "learner", "model")):
        node: Any = state
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    raise KeyError("no model weights under 'model', 'learner.model' or 'trainer.learner.model'")


def manifest_kind(manifest: dict[str, Any]) -> str:
    """``"full"`` or ``"delta"`` (manifests written before deltas existed are full).

    >>> manifest_kind({}), manifest_kind({"kind": "delta"})
    ('full', 'delta')
    """
    return "delta" if manifest.get("kind") == "delta" else "full"


def compute_delta(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What turns weights ``base`` into ``new``: changed rows of tables, other tensors whole.

    A tensor of two or more dimensions (an embedding table, row per id) whose changed
    rows take fewer bytes than the whole goes in as ``rows[name] = {"index", "values"}``
    — the rows where any value differs (``!=``, so a NaN always counts as changed) —
    every other tensor (and any non-tensor extra state) whole in ``dense``. A packed table (``<t>.packed_rows``, the
    sorted ids of trained rows, and ``<t>.packed_values``, their rows; see
    :class:`learner.embeddings.FieldEmbedding`) goes in as ``packed[<t>] = {"ids",
    "values", "dropped"}``: the ids whose row is new or differs, their rows, and ids
    no longer trained. Exact: ``apply_delta(base, delta)`` equals ``new`` bit for bit.
    Both must have the same keys, and the same shapes outside packed tables.

    >>> base = {"t": torch.zeros(100, 2), "b": torch.zeros(2)}
    >>> new = {"t": base["t"].clone(), "b": torch.ones(2)}
    >>> new["t"][7] = 1.0
    >>> d = compute_delta(base, new)
    >>> d["rows"]["t"]["index"].tolist(), sorted(d["dense"])
    ([7], ['b'])
    >>> all(torch.equal(apply_delta(base, d)[k], new[k]) for k in new)
    True
    """
    if set(base) != set(new):
        raise ValueError(
            f"weights differ in their keys from the base: {sorted(set(base) ^ set(new))[:5]}"
        )
    dense: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    packed: dict[str, Any] = {}
    for table in _packed_tables(new):
        packed[table] = _packed_delta(
            (base[f"{table}.packed_rows"], base[f"{table}.packed_values"]),
            (new[f"{table}.packed_rows"], new[f"{table}.packed_values"]),
        )
    skip = {f"{t}.packed_{part}" for t in packed for part in ("rows", "values")}
    for name, t in new.items():
        if name in skip:
            continue
        b = base[name]
        if not torch.is_tensor(t):  # a module's extra state (e.g. an id -> row map): whole
            dense[name] = copy.deepcopy(t)
            continue
        if not torch.is_tensor(b) or t.shape != b.shape:
            raise ValueError(f"{name!r} changed its type or shape since the base")
        if t.dim() >= 2 and t.shape[0] > 1:
            changed = (t != b).reshape(t.shape[0], -1).any(dim=1).nonzero().reshape(-1)
            row_bytes = t[0].numel() * t.element_size() + 8
            if len(changed) * row_bytes < t.numel() * t.element_size():
                rows[name] = {"index": changed.clone(), "values": t[changed].clone()}
                continue
        dense[name] = t.detach().clone()
    return {"dense": dense, "rows": rows, "packed": packed}


def _packed_tables(weights: dict[str, Any]) -> list[str]:
    return [
        k[: -len(".packed_rows")]
        for k in weights
        if k.endswith(".packed_rows") and k[: -len("rows")] + "values" in weights
    ]


def _packed_delta(
    base: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, torch.Tensor]:
    (ids_b, val_b), (ids_n, val_n) = base, new
    for ids in (ids_b, ids_n):
        if ids.dim() != 1 or (len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise ValueError("packed table ids must be sorted and unique")
    changed = torch.ones(len(ids_n), dtype=torch.bool)
    if len(ids_b) and len(ids_n):
        pos = torch.searchsorted(ids_b, ids_n).clamp(max=len(ids_b) - 1)
        known = ids_b[pos] == ids_n
        same = (val_b[pos[known]] == val_n[known]).reshape(int(known.sum()), -1).all(dim=1)
        changed[known.nonzero().reshape(-1)[same]] = False
    return {
        "ids": ids_n[changed].clone(),
        "values": val_n[changed].detach().clone(),
        "dropped": ids_b[~torch.isin(ids_b, ids_n)].clone(),
    }


def _apply_packed(
    ids_b: torch.Tensor, val_b: torch.Tensor, patch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, values, dropped = patch.get("ids"), patch.get("values"), patch.get("dropped")
    if not all(torch.is_tensor(x) for x in (ids, values, dropped)) or (
        ids.dim() != 1 or values.shape != (len(ids), *val_b.shape[1:]) or values.dtype != val_b.dtype
    ):
        raise ValueError("packed rows do not fit the base table")
    keep = ~(torch.isin(ids_b, ids) | torch.isin(ids_b, dropped))
    all_ids = torch.cat([ids_b[keep], ids])
    order = torch.argsort(all_ids)
    return all_ids[order], torch.cat([val_b[keep], values])[order]


def apply_delta(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """New weights: ``base`` with ``delta`` applied; ``base`` is never modified.

    Copy on write: a table with changed rows is copied once and patched, a table with
    none is the base's own tensor (shared, read-only in serving). Raises ``ValueError``
    when the delta does not cover exactly the base's tensors with fitting shapes.
    """
    dense, rows, packed = delta.get("dense"), delta.get("rows"), delta.get("packed", {})
    if not all(isinstance(x, dict) for x in (dense, rows, packed)):
        raise ValueError("a delta holds 'dense', 'rows' and 'packed' dictionaries")
    covered = [*dense, *rows, *(f"{t}.packed_{p}" for t in packed for p in ("rows", "values"))]
    if len(covered) != len(set(covered)) or set(covered) != set(base):
        raise ValueError(
            f"the delta does not cover exactly the base's tensors: {sorted(set(covered) ^ set(base))[:5]}"
        )
    out: dict[str, Any] = {}
    for table, patch in packed.items():
        out[f"{table}.packed_rows"], out[f"{table}.packed_values"] = _apply_packed(
            base[f"{table}.packed_rows"], base[f"{table}.packed_values"], patch
        )
    for name, b in base.items():
        if name in out:
            continue
        if name in dense:
            t = dense[name]
            if not torch.is_tensor(b) and not torch.is_tensor(t):
                out[name] = t  # extra state, whole
                continue
            if not torch.is_tensor(t) or t.shape != b.shape or t.dtype != b.dtype:
                raise ValueError(f"delta tensor {name!r} does not fit the base's {tuple(b.shape)}")
            out[name] = t
            continue
        patch = rows[name]
        index, values = patch.get("index"), patch.get("values")
        if (
            not torch.is_tensor(index)
            or not torch.is_tensor(values)
            or index.dim() != 1
            or values.shape != (len(index), *b.shape[1:])
            or values.dtype != b.dtype
            or (len(index) and (int(index.min()) < 0 or int(index.max()) >= b.shape[0]))
        ):
            raise ValueError(f"delta rows of {name!r} do not fit the base's {tuple(b.shape)}")
        if len(index):
            t = b.clone()
            t[index] = values
            out[name] = t
        else:
            out[name] = b
    return out


def patch_model(model: torch.nn.Module, delta: dict[str, Any]) -> torch.nn.Module | None:
    """A new model: ``model`` (a rebuilt base full checkpoint, never modified) with
    ``delta`` applied, or ``None`` when only a rebuild can apply it.

    What :func:`apply_delta` followed by :func:`rebuild_model` gives, without the
    rebuild: the module tree is copied with every tensor and array shared, then only
    what the delta changes is replaced — a table with changed rows is copied once and
    patched (copy on write), a dense tensor is the delta's own. Packed embedding
    tables take their new rows without regenerating the untouched ones. ``None``
    (the caller rebuilds) for what patching does not cover: dropped packed rows
    (their initial draw would have to be regenerated), non-tensor extra state, a
    patched tensor shared by two modules, or a changed packed-table seed. Raises
    ``ValueError`` when the delta does not fit the model, like :func:`apply_delta`.

    >>> from learner.models import build_model
    >>> base = build_model({"kind": "deepfm", "categorical": ["u"], "dense": ["x"],
    ...                     "embedding": {"dim": 2, "buckets": 8}}).eval()
    >>> new = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     _ = new.embedding.table.weight[3].fill_(1.0)
    >>> new.embedding.mark_dirty([3])
    >>> patched = patch_model(base, compute_delta(base.state_dict(), new.state_dict()))
    >>> all(torch.equal(a, b) for a, b in zip(patched.state_dict().values(), new.state_dict().values()))
    True
    >>> patched.embedding.table.weight is base.embedding.table.weight
    False
    """
    from learner.embeddings import FieldEmbedding

    dense, rows, packed = delta.get("dense"), delta.get("rows"), delta.get("packed", {})
    if not all(isinstance(x, dict) for x in (dense, rows, packed)):
        raise ValueError("a delta holds 'dense', 'rows' and 'packed' dictionaries")
    state = model.state_dict(keep_vars=True)
    covered = [*dense, *rows, *(f"{t}.packed_{p}" for t in packed for p in ("rows", "values"))]
    if len(covered) != len(set(covered)) or set(covered) != set(state):
        raise ValueError(
            f"the delta does not cover exactly the model's tensors: {sorted(set(covered) ^ set(state))[:5]}"
        )
    owners: dict[int, int] = {}
    for _, t in [*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)]:
        owners[id(t)] = owners.get(id(t), 0) + 1
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    plan: dict[str, torch.Tensor] = {}  # parameter or buffer name -> its new tensor
    tables: dict[str, tuple[FieldEmbedding, torch.Tensor]] = {}  # module name -> (module, ids)
    for name, t in dense.items():
        if name in tensors:
            b = tensors[name]
            if not torch.is_tensor(t) or t.shape != b.shape or t.dtype != b.dtype:
                raise ValueError(f"delta tensor {name!r} does not fit the model's {tuple(b.shape)}")
            if not torch.equal(t, b):
                plan[name] = t
        elif not (torch.is_tensor(t) and torch.equal(t, state[name])):
            return None  # extra state, or a packed table's seed or size changed
    for name, patch in rows.items():
        b = tensors.get(name)
        index, values = patch.get("index"), patch.get("values")
        if b is None:
            return None
        if (
            not torch.is_tensor(index) or not torch.is_tensor(values) or index.dim() != 1
            or values.shape != (len(index), *b.shape[1:]) or values.dtype != b.dtype
            or (len(index) and (int(index.min()) < 0 or int(index.max()) >= b.shape[0]))
        ):
            raise ValueError(f"delta rows of {name!r} do not fit the model's {tuple(b.shape)}")
        if len(index):
            plan[name] = b.detach().clone()
            plan[name][index] = values
    for table, patch in packed.items():
        owner = model.get_submodule(table.removesuffix(".table"))
        ids, values, dropped = patch.get("ids"), patch.get("values"), patch.get("dropped")
        if not isinstance(owner, FieldEmbedding) or not table.endswith(".table"):
            return None
        weight = owner.table.weight
        if not all(torch.is_tensor(x) for x in (ids, values, dropped)) or (
            ids.dim() != 1 or values.shape != (len(ids), weight.shape[1]) or values.dtype != weight.dtype
            or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]))
        ):
            raise ValueError(f"packed rows of {table!r} do not fit the model's table")
        if len(dropped):
            return None
        if len(ids):
            plan[f"{table}.weight"] = weight.detach().clone()
            plan[f"{table}.weight"][ids] = values
            tables[table.removesuffix(".table")] = (owner, ids)
    if any(owners.get(id(tensors[name]), 0) > 1 for name in plan):
        return None
    # Copy the module tree, sharing every tensor and array (the memo maps each to itself).
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in [*m.parameters(recurse=False), *m.buffers(recurse=False), *vars(m).values()]:
            if torch.is_tensor(v) or type(v).__module__ == "numpy":
                memo[id(v)] = v
    out = copy.deepcopy(model, memo)
    for name, t in plan.items():
        prefix, _, leaf = name.rpartition(".")
        mod = out.get_submodule(prefix)
        old = getattr(mod, leaf)
        setattr(mod, leaf, torch.nn.Parameter(t, requires_grad=old.requires_grad)
                if isinstance(old, torch.nn.Parameter) else t)
    for name, (owner, ids) in tables.items():
        emb = out.get_submodule(name)
        emb.dirty = owner.dirty.copy()
        emb.mark_dirty(ids.numpy())
    return out.eval()


def rebuild_model(config: dict[str, Any], weights: dict[str, Any]) -> torch.nn.Module:
    """The one way a published ranker is rebuilt: from its manifest config and weights.

    The model is built on the ``meta`` device and the loaded tensors are assigned, which
    skips random initialisation of tables that are overwritten anyway (half of a load's
    CPU time for a 50 MB model, taken from the cores that serve requests). A model that
    keeps tensors outside its state dict (FGCNN's pair indices), or whose load hooks
    need real values (packed embedding tables), is built the ordinary way instead, and
    that build's errors propagate: weights that do not fit the config raise
    ``RuntimeError`` from ``load_state_dict``; nothing is swallowed.
    """
    from learner.models import build_model

    spec = config["model"] if "model" in config else config
    try:
        with torch.device("meta"):
            model = build_model(spec)
        model.load_state_dict(weights, strict=True, assign=True)
        if not has_meta_tensors(model):
            return model.eval()
    except (RuntimeError, NotImplementedError):
        pass  # the meta device cannot run every load hook; the ordinary build decides, and raises
    model = build_model(spec)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def has_meta_tensors(model: torch.nn.Module) -> bool:
    """Whether any parameter, buffer or tensor attribute of ``model`` is still on ``meta``."""
    for m in model.modules():
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        tensors += [v for v in vars(m).values() if torch.is_tensor(v)]
        if any(t.is_meta for t in tensors):
            return True
    return False


@runtime_checkable
class ModelStore(Protocol):
    """What the learner publishes through and serving loads from (docs/contracts.md).

    Promises, kept by every implementation and checked by one contract suite:
    versions are six-digit, increasing and immutable; a version is visible whole or not
    at all; :meth:`load` verifies size, sha256 and the feature-schema hash and raises
    :class:`CheckpointError` naming the version and the problem; pins survive restarts
    and protect from retention; retention never deletes the newest version.
    """

    model: str
    keep: int

    @property
    def location(self) -> str:
        """Where the model's versions live, for messages (no credentials)."""
        ...

    def versions(self) -> list[str]: ...
    def exists(self, version: str) -> bool: ...
    def manifest(self, version: str) -> dict[str, Any]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def latest(self) -> str | None: ...
    def verify(self, version: str, expected_schema_hash: str | None = None) -> dict[str, Any]: ...
    def latest_good(self, expected_schema_hash: str | None = None) -> str | None: ...
    def load(
        self, version: str | None = None, expected_schema_hash: str | None = None
    ) -> LoadedCheckpoint: ...
    def load_model(
        self, version: str | None = None, expected_schema_hash: str | None = None
    ) -> tuple[torch.nn.Module, dict[str, Any]]: ...
    def publish(
        self,
        state: dict[str, Any],
        *,
        config: dict[str, Any],
        feature_schema_json: str,
        feature_schema_hash: str,
        rows_trained: int,
        watermarks: dict[str, Any],
        metrics: dict[str, Any],
        parent: str | None = None,
    ) -> dict[str, Any]: ...
    def publish_delta(
        self,
        delta: dict[str, Any],
        *,
        base: str,
        rows_trained: int,
        watermarks: dict[str, Any],
        metrics: dict[str, Any],
        base_sha256: str | None = None,
    ) -> dict[str, Any]: ...
    def kind(self, version: str) -> tuple[str, str | None]: ...
    def load_weights(
        self, version: str, expected_schema_hash: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def pins(self) -> list[str]: ...
    def pin(self, version: str) -> None: ...
    def unpin(self, version: str) -> None: ...
    def prune(self) -> list[str]: ...
    def clear(self) -> None: ...
    def forget_cached(self) -> None: ...


class VersionedStore:
    """Everything a model store does above its storage: manifests, checks, pins, retention.

    Subclasses provide the storage primitives (the ``_``-prefixed methods below that
    raise ``NotImplementedError``) and :meth:`_write_version`, which must make a version
    visible atomically.
    """

    def __init__(self, model: str, keep: int) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model):
            raise ValueError(f"model name {model!r} must match [A-Za-z0-9._-]+")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.model = model
        self.keep = keep
        self._kinds: dict[str, tuple[str, str | None]] = {}  # versions are immutable

    # ---- storage primitives -----------------------------------------------------------
    @property
    def location(self) -> str:
        raise NotImplementedError

    def _version_names(self) -> list[str]:
        """Names of visible versions (any order)."""
        raise NotImplementedError

    def exists(self, version: str) -> bool:
        raise NotImplementedError

    def _read_manifest(self, version: str) -> bytes:
        """The manifest's bytes; ``FileNotFoundError`` if it is missing."""
        raise NotImplementedError

    def _open_weights(self, version: str, name: str) -> IO[bytes]:
        """A seekable handle on a version's weights; ``FileNotFoundError`` if missing."""
        raise NotImplementedError

    def _write_version(
        self, version: str, state: dict[str, Any], build: ManifestBuilder
    ) -> tuple[dict[str, Any], str]:
        """Write weights then manifest, visible atomically; return (manifest, location)."""
        raise NotImplementedError

    def _read_pins(self) -> bytes | None:
        raise NotImplementedError

    def _write_pins(self, data: bytes) -> None:
        raise NotImplementedError

    def _delete_version(self, version: str) -> None:
        """Delete a version, manifest first (so it disappears as a whole)."""
        raise NotImplementedError

    def _clean_leftovers(self) -> None:
        """Remove what a publication that crashed midway left behind (when old)."""

    def clear(self) -> None:
        """Delete every version and pin of this model (``headwater reset``)."""
        raise NotImplementedError

    def forget_cached(self) -> None:
        """Drop what this object cached about versions (their kinds): another process
        cleared the store, and its version numbers may now name other checkpoints."""
        self._kinds.clear()

    # ---- reading -------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Visible versions, oldest first."""
        return sorted((v for v in self._version_names() if _VERSION_RE.match(v)), key=int)

    def manifest(self, version: str) -> dict[str, Any]:
        """The manifest of ``version``; :class:`CheckpointError` if missing or unreadable."""
        try:
            data = json.loads(self._read_manifest(version).decode("utf-8"))
        except StoreUnavailable:
            raise
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.model} version {version}: manifest.json is missing"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{self.model} version {version}: manifest.json unreadable: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.model} version {version}: manifest.json is not an object")
        missing = [k for k in _MANIFEST_KEYS if k not in data]
        if missing:
            raise CheckpointError(f"{self.model} version {version}: manifest.json lacks {missing}")
        if str(data["version"]) != version or data["model"] != self.model:
            raise CheckpointError(
                f"{self.model} version {version}: manifest.json describes "
                f"{data['model']!r} version {data['version']!r}"
            )
        name = data.get("file", WEIGHTS_FILE)
        if not isinstance(name, str) or not _FILE_RE.match(name):
            raise CheckpointError(
                f"{self.model} version {version}: manifest.json names weights file {name!r}"
            )
        kind = manifest_kind(data)
        self._kinds[version] = (kind, str(data.get("base")) if kind == "delta" else None)
        return data

    def kind(self, version: str) -> tuple[str, str | None]:
        """``(kind, base)`` of a version: ``("full", None)`` or ``("delta", base version)``.

        Raises :class:`CheckpointError` if its manifest is unreadable (cached once read).
        """
        known = self._kinds.get(version)
        if known is None:
            m = self.manifest(version)
            known = self._kinds[version] = (
                manifest_kind(m), str(m.get("base")) if manifest_kind(m) == "delta" else None
            )
        return known

    def _is_delta(self, version: str) -> bool:
        try:
            return self.kind(version)[0] == "delta"
        except CheckpointError:
            return False  # unreadable: counted like a full one (retention), never loaded

    def list(self) -> list[dict[str, Any]]:
        """One summary per version (newest last), with ``pinned`` and any manifest error."""
        pins = set(self.pins())
        out = []
        for v in self.versions():
            try:
                m = self.manifest(v)
                out.append(
                    {
                        "version": v,
                        "created_at": m["created_at"],
                        "rows_trained": m["rows_trained"],
                        "metrics": m["metrics"],
                        "pinned": v in pins,
                        "kind": manifest_kind(m),
                        "base": m.get("base"),
                        "error": None,
                    }
                )
            except CheckpointError as exc:
                out.append({"version": v, "pinned": v in pins, "error": str(exc)})
        return out

    def latest(self) -> str | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def _checked_weights(
        self, version: str, expected_schema_hash: str | None
    ) -> tuple[dict[str, Any], IO[bytes]]:
        """The manifest and a handle on weights whose size and sha256 match it (at 0)."""
        manifest = self.manifest(version)
        name = manifest.get("file", WEIGHTS_FILE)
        if (
            expected_schema_hash is not None
            and manifest["feature_schema_hash"] != expected_schema_hash
        ):
            raise CheckpointError(
                f"{self.model} version {version}: feature schema hash "
                f"{str(manifest['feature_schema_hash'])[:12]}… differs from the expected "
                f"{expected_schema_hash[:12]}…"
            )
        try:
            fh = self._open_weights(version, name)
        except FileNotFoundError:
            raise CheckpointError(f"{self.model} version {version}: {name} is missing") from None
        try:
            digest, size = sha256_stream(fh)
            if size != manifest["bytes"]:
                raise CheckpointError(
                    f"{self.model} version {version}: {name} has {size} bytes, "
                    f"manifest says {manifest['bytes']}"
                )
            if digest != manifest["sha256"]:
                raise CheckpointError(
                    f"{self.model} version {version}: sha256 mismatch (file {digest[:12]}…, "
                    f"manifest {str(manifest['sha256'])[:12]}…): the checkpoint was altered or torn"
                )
            fh.seek(0)
        except BaseException:
            fh.close()
            raise
        return manifest, fh

    def verify(self, version: str, expected_schema_hash: str | None = None) -> dict[str, Any]:
        """Check files, sha256, size and schema hash; return the manifest or raise."""
        manifest, fh = self._checked_weights(version, expected_schema_hash)
        fh.close()
        return manifest

    def latest_good(self, expected_schema_hash: str | None = None) -> str | None:
        """Newest full checkpoint that verifies (skipping torn or tampered ones), or ``None``."""
        for v in reversed(self.versions()):
            if self._is_delta(v):
                continue
            try:
                self.verify(v, expected_schema_hash)
                return v
            except CheckpointError:
                continue
        return None

    def load(
        self, version: str | None = None, expected_schema_hash: str | None = None
    ) -> LoadedCheckpoint:
        """Verify then load a version (default: the latest good one) with ``weights_only=True``."""
        if version is None:
            version = self.latest_good(expected_schema_hash)
            if version is None:
                raise CheckpointError(f"{self.model}: no loadable version in {self.location}")
        manifest, fh = self._checked_weights(version, expected_schema_hash)
        name = manifest.get("file", WEIGHTS_FILE)
        try:
            with fh:
                state = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError...)
            raise CheckpointError(
                f"{self.model} version {version}: {name} not loadable: {exc}"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.model} version {version}: {name} does not hold a dict")
        return LoadedCheckpoint(
            manifest=manifest, state=state, location=f"{self.location}/{version}"
        )

    def load_model(
        self, version: str | None = None, expected_schema_hash: str | None = None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Rebuild the ranker from the manifest's config and load its weights, in eval mode.

        A delta is assembled on its base (:meth:`load_weights`). Returns
        ``(ranker, manifest)``; raises :class:`CheckpointError` on any mismatch.
        """
        if version is None:
            version = self.latest_good(expected_schema_hash)
            if version is None:
                raise CheckpointError(f"{self.model}: no loadable version in {self.location}")
        weights, manifest = self.load_weights(version, expected_schema_hash)
        try:
            model = rebuild_model(manifest["config"], weights)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.model} version {version}: weights do not fit the manifest config: {exc}"
            ) from None
        return model, manifest

    def load_weights(
        self, version: str, expected_schema_hash: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(model weights, manifest)`` of a version; a delta is applied to its base.

        A delta whose base is gone, is itself a delta, or whose sha256 is not the
        delta's ``base_sha256`` (another base under that number) raises
        :class:`CheckpointError` saying so.
        """
        ck = self.load(version, expected_schema_hash)
        if manifest_kind(ck.manifest) != "delta":
            try:
                return checkpoint_weights(ck.state), ck.manifest
            except KeyError as exc:
                raise CheckpointError(f"{self.model} version {version}: {exc}") from None
        base = self.load(self.check_base(ck.manifest), expected_schema_hash)
        return self.assemble(checkpoint_weights(base.state), ck), ck.manifest

    def check_base(self, delta_manifest: dict[str, Any], base_manifest: dict[str, Any] | None = None) -> str:
        """The base version of a delta, once its manifest is that base's (else raise)."""
        version, base = delta_manifest["version"], str(delta_manifest.get("base"))
        if base_manifest is None:
            if not self.exists(base):
                raise CheckpointError(
                    f"{self.model} version {version}: delta on base {base}, which is not in the store"
                )
            base_manifest = self.manifest(base)
        if manifest_kind(base_manifest) != "full" or str(base_manifest["version"]) != base:
            raise CheckpointError(
                f"{self.model} version {version}: delta on base {base}, but "
                f"{base_manifest['version']} is not that full checkpoint"
            )
        if base_manifest["sha256"] != delta_manifest.get("base_sha256"):
            raise CheckpointError(
                f"{self.model} version {version}: delta on another base: it was computed "
                f"against base {base} with sha256 {str(delta_manifest.get('base_sha256'))[:12]}…, "
                f"the base here has {str(base_manifest['sha256'])[:12]}…"
            )
        return base

    def assemble(self, base_weights: dict[str, Any], delta: LoadedCheckpoint) -> dict[str, Any]:
        """The weights of a delta version: its delta applied (copy on write) to its base's."""
        try:
            return apply_delta(base_weights, delta.state["delta"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.model} version {delta.manifest['version']}: delta does not apply to "
                f"base {delta.manifest.get('base')}: {exc!r}"
            ) from None

    # ---- writing -------------------------------------------------------------------
    def publish(
        self,
        state: dict[str, Any],
        *,
        config: dict[str, Any],
        feature_schema_json: str,
        feature_schema_hash: str,
        rows_trained: int,
        watermarks: dict[str, Any],
        metrics: dict[str, Any],
        parent: str | None = None,
    ) -> dict[str, Any]:
        """Write a new version atomically, prune old ones; return its manifest plus ``path``."""
        return self._publish(
            state, {}, config=config, feature_schema_json=feature_schema_json,
            feature_schema_hash=feature_schema_hash, rows_trained=rows_trained,
            watermarks=watermarks, metrics=metrics, parent=parent,
        )

    def publish_delta(
        self,
        delta: dict[str, Any],
        *,
        base: str,
        rows_trained: int,
        watermarks: dict[str, Any],
        metrics: dict[str, Any],
        base_sha256: str | None = None,
    ) -> dict[str, Any]:
        """Publish ``delta`` (:func:`compute_delta` against full checkpoint ``base``).

        Config and feature schema are the base's; the manifest says ``"kind": "delta"``,
        ``"base"`` and ``"base_sha256"``. Raises :class:`CheckpointError` if ``base`` is
        not a full checkpoint in the store, or (``base_sha256``: the sha256 of the
        checkpoint the delta was computed against, as its publisher knows it) if the
        store's ``base`` is another checkpoint under that number (the store was wiped or
        another learner published there): a delta never names a base it was not computed from.
        """
        if not self.exists(base):
            raise CheckpointError(f"{self.model}: cannot publish a delta on unknown base {base!r}")
        bm = self.manifest(base)
        if manifest_kind(bm) != "full":
            raise CheckpointError(f"{self.model}: base {base} of a delta must be a full checkpoint")
        if base_sha256 is not None and bm["sha256"] != base_sha256:
            raise CheckpointError(
                f"{self.model}: base {base} in the store (sha256 {str(bm['sha256'])[:12]}…) is not "
                f"the checkpoint the delta was computed against ({base_sha256[:12]}…)"
            )
        schema = bm["feature_schema"]
        return self._publish(
            {"delta": delta},
            {"kind": "delta", "base": base, "base_sha256": bm["sha256"]},
            config=bm["config"],
            feature_schema_json=schema if isinstance(schema, str) else json.dumps(schema),
            feature_schema_hash=bm["feature_schema_hash"], rows_trained=rows_trained,
            watermarks=watermarks, metrics=metrics, parent=base,
        )

    def _publish(
        self,
        state: dict[str, Any],
        extra: dict[str, Any],
        *,
        config: dict[str, Any],
        feature_schema_json: str,
        feature_schema_hash: str,
        rows_trained: int,
        watermarks: dict[str, Any],
        metrics: dict[str, Any],
        parent: str | None,
    ) -> dict[str, Any]:
        latest = self.latest()
        version = f"{(int(latest) if latest else 0) + 1:06d}"
        try:
            schema_obj: Any = json.loads(feature_schema_json)
        except json.JSONDecodeError:
            schema_obj = feature_schema_json

        def build(sha256: str, size: int, name: str) -> dict[str, Any]:
            manifest = {
                "model": self.model,
                "version": version,
                "created_at": time.time(),
                "feature_schema_hash": feature_schema_hash,
                "feature_schema": schema_obj,
                "sha256": sha256,
                "bytes": size,
                "rows_trained": int(rows_trained),
                "watermarks": watermarks,
                "metrics": json_safe(metrics),
                "config": json_safe(config),
                "parent": parent,
                **extra,
            }
            if name != WEIGHTS_FILE:
                manifest["file"] = name
            return manifest

        manifest, location = self._write_version(version, state, build)
        self.prune()
        return {**manifest, "path": location}

    def pins(self) -> list[str]:
        try:
            raw = self._read_pins()
            if raw is None:
                return []
            data = json.loads(raw.decode("utf-8"))
        except StoreUnavailable:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.model}: pins.json unreadable: {exc}") from None
        if isinstance(data, dict):
            data = data.get("pinned", [])
        if not isinstance(data, list) or not all(_VERSION_RE.match(str(v)) for v in data):
            raise CheckpointError(f"{self.model}: pins.json does not hold a list of versions")
        return sorted({str(v) for v in data}, key=int)

    def _save_pins(self, pins: list[str]) -> None:
        self._write_pins(json.dumps(sorted(set(pins), key=int)).encode("utf-8"))

    def pin(self, version: str) -> None:
        """Protect ``version`` from retention (it must exist)."""
        if not self.exists(version):
            raise CheckpointError(f"{self.model}: cannot pin unknown version {version!r}")
        self._save_pins(self.pins() + [version])

    def unpin(self, version: str) -> None:
        self._save_pins([v for v in self.pins() if v != version])

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep`` full checkpoints, the newest ``keep`` versions
        of any kind, the deltas of the newest full checkpoint, pinned versions and the newest
        (each kept delta with its base); return the deleted.
        """
        versions = self.versions()
        fulls = [v for v in versions if not self._is_delta(v)]
        pins = set(self.pins())
        protected = set(fulls[-self.keep :]) | set(versions[-self.keep :]) | pins
        newest_full = fulls[-1] if fulls else None
        for v in versions:
            if self._is_delta(v) and self.kind(v)[1] == newest_full:
                protected.add(v)
        for v in list(protected):
            if self._is_delta(v) and (base := self.kind(v)[1]) is not None:
                protected.add(base)
        deleted = []
        for v in versions[:-1]:
            if v not in protected:
                self._delete_version(v)
                self._kinds.pop(v, None)
                deleted.append(v)
        self._clean_leftovers()
        return deleted


class LocalModelStore(VersionedStore):
    """Publish, list, verify, load, pin and prune versions of one model in a directory.

    >>> import tempfile
    >>> store = LocalModelStore(tempfile.mkdtemp(), "ranker", keep=2)
    >>> m = store.publish({"w": torch.ones(2)}, config={"kind": "lr"}, feature_schema_json="{}",
    ...                   feature_schema_hash="h", rows_trained=10, watermarks={}, metrics={})
    >>> m["version"], store.load(m["version"], expected_schema_hash="h").state["w"].tolist()
    ('000001', [1.0, 1.0])
    """

    def __init__(self, root: str | os.PathLike[str], model: str = "ranker", keep: int = 5) -> None:
        super().__init__(model, keep)
        self.root = Path(root)
        self.dir = self.root / model
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return str(self.dir)

    def path(self, version: str) -> Path:
        return self.dir / version

    def _version_names(self) -> list[str]:
        return [p.name for p in self.dir.iterdir() if p.is_dir()]

    def exists(self, version: str) -> bool:
        return bool(_VERSION_RE.match(version)) and (self.dir / version).is_dir()

    def _read_manifest(self, version: str) -> bytes:
        return (self.dir / version / "manifest.json").read_bytes()

    def _open_weights(self, version: str, name: str) -> IO[bytes]:
        path = self.dir / version / name
        if not path.is_file():
            raise FileNotFoundError(path)
        return open(path, "rb")

    def _write_version(
        self, version: str, state: dict[str, Any], build: ManifestBuilder
    ) -> tuple[dict[str, Any], str]:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.dir))
        try:
            pt = tmp / WEIGHTS_FILE
            with open(pt, "w+b") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
                fh.seek(0)
                sha256, size = sha256_stream(fh)
            manifest = build(sha256, size, WEIGHTS_FILE)
            with open(tmp / "manifest.json", "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, sort_keys=True, allow_nan=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o755)
            os.rename(tmp, self.dir / version)  # fails if another writer took the version
            _fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest, str(self.dir / version)

    def _read_pins(self) -> bytes | None:
        try:
            return (self.dir / "pins.json").read_bytes()
        except FileNotFoundError:
            return None

    def _write_pins(self, data: bytes) -> None:
        tmp = self.dir / f".pins-{os.getpid()}.json"
        tmp.write_bytes(data)
        os.replace(tmp, self.dir / "pins.json")

    def _delete_version(self, version: str) -> None:
        # Renamed away first, so the version disappears as a whole, then removed.
        doomed = self.dir / f".del-{version}-{os.getpid()}"
        try:
            os.rename(self.dir / version, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        # Leftovers of a crash mid-publish are invisible; clean them when old.
        for p in [*self.dir.glob(".tmp-*"), *self.dir.glob(".del-*")]:
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                continue

    def clear(self) -> None:
        self._kinds.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
