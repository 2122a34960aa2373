"""The model store: versioned checkpoints + manifests on a filesystem (docs/contracts.md).

Layout: ``<root>/<model>/<version>/{model.pt,manifest.json}`` and ``<root>/<model>/pins.json``.
A version becomes visible atomically: it is written under a temporary name, fsynced,
then renamed. ``model.pt`` holds tensors and plain containers only, so loading uses
``torch.load(weights_only=True)`` and the model is rebuilt from the manifest's config
(never from pickled objects). The learner service writes ``model.pt`` as
``{"model": state_dict, "optimizer": ..., "trainer": {watermarks, counters, metrics},
"consumer_positions": {...}}``; serving needs only ``"model"``. Retention keeps the newest ``keep`` versions plus every
pinned one, and never deletes the newest.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "LoadedCheckpoint", "ModelStore"]

_VERSION_RE = re.compile(r"^\d{6,}$")
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


class CheckpointError(Exception):
    """A checkpoint that must not be used; the message names the version and the problem."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    manifest: dict[str, Any]
    state: dict[str, Any]
    path: Path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


class ModelStore:
    """Publish, list, verify, load, pin and prune versions of one model.

    >>> import tempfile
    >>> store = ModelStore(tempfile.mkdtemp(), "ranker", keep=2)
    >>> m = store.publish({"w": torch.ones(2)}, config={"kind": "lr"}, feature_schema_json="{}",
    ...                   feature_schema_hash="h", rows_trained=10, watermarks={}, metrics={})
    >>> m["version"], store.load(m["version"], expected_schema_hash="h").state["w"].tolist()
    ('000001', [1.0, 1.0])
    """

    def __init__(self, root: str | os.PathLike[str], model: str = "ranker", keep: int = 5) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model):
            raise ValueError(f"model name {model!r} must match [A-Za-z0-9._-]+")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.model = model
        self.keep = keep
        self.dir = self.root / model
        self.dir.mkdir(parents=True, exist_ok=True)

    # ---- reading -------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Visible versions, oldest first."""
        names = [p.name for p in self.dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(names, key=int)

    def path(self, version: str) -> Path:
        return self.dir / version

    def manifest(self, version: str) -> dict[str, Any]:
        """The manifest of ``version``; :class:`CheckpointError` if missing or unreadable."""
        path = self.dir / version / "manifest.json"
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.model} version {version}: manifest.json is missing"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{self.model} version {version}: manifest.json unreadable: {exc}"
            ) from None
        missing = [k for k in _MANIFEST_KEYS if k not in data]
        if missing:
            raise CheckpointError(f"{self.model} version {version}: manifest.json lacks {missing}")
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

    def verify(self, version: str, expected_schema_hash: str | None = None) -> dict[str, Any]:
        """Check files, sha256, size and schema hash; return the manifest or raise."""
        manifest = self.manifest(version)
        pt = self.dir / version / "model.pt"
        if not pt.is_file():
            raise CheckpointError(f"{self.model} version {version}: model.pt is missing")
        size = pt.stat().st_size
        if size != manifest["bytes"]:
            raise CheckpointError(
                f"{self.model} version {version}: model.pt has {size} bytes, manifest says {manifest['bytes']}"
            )
        digest = _sha256_file(pt)
        if digest != manifest["sha256"]:
            raise CheckpointError(
                f"{self.model} version {version}: sha256 mismatch (file {digest[:12]}…, "
                f"manifest {str(manifest['sha256'])[:12]}…): the checkpoint was altered or torn"
            )
        if (
            expected_schema_hash is not None
            and manifest["feature_schema_hash"] != expected_schema_hash
        ):
            raise CheckpointError(
                f"{self.model} version {version}: feature schema hash "
                f"{manifest['feature_schema_hash'][:12]}… differs from the expected "
                f"{expected_schema_hash[:12]}…"
            )
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
                raise CheckpointError(f"{self.model}: no loadable version in {self.dir}")
        manifest = self.verify(version, expected_schema_hash)
        pt = self.dir / version / "model.pt"
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError...)
            raise CheckpointError(
                f"{self.model} version {version}: model.pt not loadable: {exc}"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.model} version {version}: model.pt does not hold a dict")
        return LoadedCheckpoint(manifest=manifest, state=state, path=self.dir / version)

    def load_model(self, version: str | None = None, expected_schema_hash: str | None = None):  # noqa: ANN201
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
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.dir))
        try:
            pt = tmp / "model.pt"
            with open(pt, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                schema_obj: Any = json.loads(feature_schema_json)
            except json.JSONDecodeError:
                schema_obj = feature_schema_json
            manifest = {
                "model": self.model,
                "version": version,
                "created_at": time.time(),
                "feature_schema_hash": feature_schema_hash,
                "feature_schema": schema_obj,
                "sha256": _sha256_file(pt),
                "bytes": pt.stat().st_size,
                "rows_trained": int(rows_trained),
                "watermarks": watermarks,
                "metrics": json_safe(metrics),
                "config": json_safe(config),
                "parent": parent,
            }
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
        self.prune()
        return {**manifest, "path": str(self.dir / version)}

    def pins(self) -> list[str]:
        path = self.dir / "pins.json"
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.model}: pins.json unreadable: {exc}") from None
        if isinstance(data, dict):
            data = data.get("pinned", [])
        return sorted({str(v) for v in data}, key=int)

    def _write_pins(self, pins: list[str]) -> None:
        tmp = self.dir / f".pins-{os.getpid()}.json"
        tmp.write_text(json.dumps(sorted(set(pins), key=int)), "utf-8")
        os.replace(tmp, self.dir / "pins.json")

    def pin(self, version: str) -> None:
        """Protect ``version`` from retention (it must exist)."""
        if version not in self.versions():
            raise CheckpointError(f"{self.model}: cannot pin unknown version {version!r}")
        self._write_pins(self.pins() + [version])

    def unpin(self, version: str) -> None:
        self._write_pins([v for v in self.pins() if v != version])

    def prune(self) -> list[str]:
        """Delete versions beyond the newest ``keep`` except pinned ones; return the deleted."""
        versions = self.versions()
        protected = set(versions[-self.keep :]) | set(self.pins())
        deleted = []
        for v in versions[:-1]:
            if v not in protected:
                shutil.rmtree(self.dir / v, ignore_errors=True)
                deleted.append(v)
        # Leftovers of a crash mid-publish are invisible; clean them when old.
        for p in self.dir.glob(".tmp-*"):
            if time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
        return deleted
