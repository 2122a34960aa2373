"""The model store: versioned checkpoints + manifests (docs/contracts.md).

:class:`ModelStore` is the seam (a protocol); two implementations keep the same promises
and run the same contract suite (``tests/learner/test_store_contract.py``):

- :class:`LocalModelStore`, a directory: ``<root>/<model>/<version>/{model.pt,manifest.json}``
  and ``<root>/<model>/pins.json``. A version is written under a temporary name,
  fsynced, then renamed, so it becomes visible at once.
- :class:`learner.store_s3.ObjectModelStore`, S3-compatible object storage (``s3://``):
  the weights object first, the manifest last, so a version is visible exactly when its
  manifest exists (object writes are atomic, listings strongly consistent).

Both verify size and sha256 against the manifest before loading, and load with
``torch.load(weights_only=True)``: the model is rebuilt from the manifest's config
(never from pickled objects). The learner service writes ``model.pt`` as
``{"model": state_dict, "optimizer": ..., "trainer": {watermarks, counters, metrics},
"consumer_positions": {...}}``; serving needs only ``"model"``. Retention keeps the newest
``keep`` versions plus every pinned one, and never deletes the newest.
"""

from __future__ import annotations

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
    def pins(self) -> list[str]: ...
    def pin(self, version: str) -> None: ...
    def unpin(self, version: str) -> None: ...
    def prune(self) -> list[str]: ...
    def clear(self) -> None: ...


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
        return data

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
        """Newest version that verifies (skipping torn or tampered ones), or ``None``."""
        for v in reversed(self.versions()):
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

        Returns ``(ranker, manifest)``; raises :class:`CheckpointError` on any mismatch.
        """
        ck = self.load(version, expected_schema_hash)
        try:
            model = rebuild_model(ck.manifest["config"], checkpoint_weights(ck.state))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.model} version {ck.manifest['version']}: weights do not fit the manifest config: {exc}"
            ) from None
        return model, ck.manifest

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
        """Delete versions beyond the newest ``keep`` except pinned ones; return the deleted."""
        versions = self.versions()
        protected = set(versions[-self.keep :]) | set(self.pins())
        deleted = []
        for v in versions[:-1]:
            if v not in protected:
                self._delete_version(v)
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
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
