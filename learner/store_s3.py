"""The model store on S3-compatible object storage (``HEADWATER_MODEL_STORE=s3://bucket/prefix``).

Learner and serving then share a bucket instead of a disk. Layout under
``<prefix>/<model>/``: ``<version>/model-<token>.pt`` (the weights), then
``<version>/manifest.json`` (names the weights object, its size and sha256), and
``pins.json``.

Atomic for readers without a rename: a single object write is all-or-nothing and
listings are strongly consistent, so the manifest is the commit record. It is written
**last**, and only if no manifest exists for that version yet (``If-None-Match: *``),
so two writers racing for one version cannot both win; the weights object carries a
random token, so the loser never overwrites the winner's weights (it deletes its own).
A version is visible exactly when its manifest exists; there is no separate "latest"
pointer to fall out of step. Retention deletes the manifest first, then the weights.
A crash between the two writes leaves a weights object without a manifest: invisible,
removed by a later prune once an hour old. Pins are one small object, replaced whole.

Errors: a missing object is a missing file (the store's own messages name it); an
unreachable endpoint, refused credentials or a missing bucket raise
:class:`StoreUnavailable` (an ``OSError``: "try again later", never "this version is
bad"). Credentials are never part of a message or of :attr:`location`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import torch

from core.net import redact_url
from core.settings import Settings
from learner.store import (
    CheckpointError,
    ManifestBuilder,
    StoreUnavailable,
    VersionedStore,
    sha256_stream,
)

__all__ = ["ObjectModelStore", "parse_s3_url"]

_SPOOL_BYTES = 64 << 20  # weights up to this size stay in memory while moving
_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/some/prefix`` (prefix without slashes around).

    >>> parse_s3_url("s3://models/prod/eu/"), parse_s3_url("s3://models")
    (('models', 'prod/eu'), ('models', ''))
    """
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?", url)
    if not m:
        raise ValueError(f"model store {url!r}: expected s3://bucket[/prefix] (a valid bucket name)")
    return m.group(1), (m.group(2) or "").strip("/")


class ObjectModelStore(VersionedStore):
    """A :class:`learner.store.ModelStore` in an S3 bucket (AWS, MinIO, Ceph, ...).

    ``client`` is a boto3 S3 client; :meth:`from_settings` builds one from the
    ``model_store_*`` settings.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        model: str = "ranker",
        keep: int = 5,
        *,
        endpoint: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(model, keep)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.base = f"{self.prefix}/{model}" if self.prefix else model
        self.endpoint = redact_url(endpoint) if endpoint else None
        self.clock = clock
        self._manifest_re = re.compile(re.escape(self.base) + r"/(\d{6,})/manifest\.json")

    @classmethod
    def from_settings(
        cls, settings: Settings, *, model: str | None = None, keep: int | None = None
    ) -> ObjectModelStore:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError(
                "HEADWATER_MODEL_STORE=s3://... needs boto3: pip install 'headwater[s3]'"
            ) from None
        bucket, prefix = parse_s3_url(str(settings.model_store))
        endpoint = settings.model_store_endpoint or None
        secret = settings.model_store_secret_key
        with _SESSION_LOCK:  # a session caches the parsed service model: clients build fast
            global _SESSION
            _SESSION = _SESSION or boto3.session.Session()
            session = _SESSION
        client = session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=settings.model_store_region or ("us-east-1" if endpoint else None),
            aws_access_key_id=settings.model_store_access_key or None,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(
                # a custom endpoint (MinIO, an IP address) rarely serves bucket subdomains
                s3={"addressing_style": "path" if endpoint else "auto"},
                retries={"max_attempts": 4, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        return cls(
            client,
            bucket,
            prefix,
            model or settings.model_name,
            settings.keep_versions if keep is None else keep,
            endpoint=endpoint,
        )

    # ---- plumbing ----------------------------------------------------------------------
    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.base}"

    def _key(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def _call(self, op: str, **kwargs: Any) -> Any:
        """One S3 call; a missing key is ``FileNotFoundError``, an outage :class:`StoreUnavailable`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.bucket}/{kwargs.get('Key', '')}") from None
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise FileExistsError(f"{self.bucket}/{kwargs.get('Key', '')}") from None
            raise StoreUnavailable(
                f"object store {self.location} ({self.endpoint or 'AWS'}): {op} failed: "
                f"{code or 'error'}: {err.get('Message', exc)}"
            ) from None
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"object store {self.location} ({self.endpoint or 'AWS'}): {op} failed: {exc}"
            ) from None

    def _keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kwargs)
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _get(self, key: str) -> bytes:
        return self._call("get_object", Key=key)["Body"].read()

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            if batch:
                self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})

    # ---- storage primitives ------------------------------------------------------------
    def _version_names(self) -> list[str]:
        out = []
        for obj in self._keys(self.base + "/"):
            m = self._manifest_re.fullmatch(obj["Key"])
            if m:
                out.append(m.group(1))
        return out

    def exists(self, version: str) -> bool:
        if not version.isdigit():
            return False
        try:
            self._call("head_object", Key=self._key(version, "manifest.json"))
        except FileNotFoundError:
            return False
        return True

    def _read_manifest(self, version: str) -> bytes:
        return self._get(self._key(version, "manifest.json"))

    def _open_weights(self, version: str, name: str) -> IO[bytes]:
        body = self._call("get_object", Key=self._key(version, name))["Body"]
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        try:
            shutil.copyfileobj(body, spool, 1 << 20)
        except BaseException:
            spool.close()
            raise
        finally:
            body.close()
        spool.seek(0)
        return spool  # type: ignore[return-value]

    def _write_version(
        self, version: str, state: dict[str, Any], build: ManifestBuilder
    ) -> tuple[dict[str, Any], str]:
        import json

        name = f"model-{uuid.uuid4().hex[:12]}.pt"
        weights_key = self._key(version, name)
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as fh:
            torch.save(state, fh)
            fh.seek(0)
            sha256, size = sha256_stream(fh)
            fh.seek(0)
            self._call("put_object", Key=weights_key, Body=fh.read())
        manifest = build(sha256, size, name)
        body = json.dumps(manifest, sort_keys=True, allow_nan=False).encode("utf-8")
        try:
            # the commit: visible from here on, and only if no one else took the version
            self._call(
                "put_object",
                Key=self._key(version, "manifest.json"),
                Body=body,
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except FileExistsError:
            self._delete([weights_key])
            raise CheckpointError(
                f"{self.model} version {version}: another writer published this version first"
            ) from None
        except BaseException:
            self._delete([weights_key])
            raise
        return manifest, f"{self.location}/{version}"

    def _read_pins(self) -> bytes | None:
        try:
            return self._get(self._key("pins.json"))
        except FileNotFoundError:
            return None

    def _write_pins(self, data: bytes) -> None:
        self._call("put_object", Key=self._key("pins.json"), Body=data)

    def _delete_version(self, version: str) -> None:
        self._delete([self._key(version, "manifest.json")])  # invisible from here on
        self._delete([o["Key"] for o in self._keys(self._key(version) + "/")])

    def _clean_leftovers(self) -> None:
        """Weights objects of a version with no manifest, older than an hour."""
        by_version: dict[str, list[dict[str, Any]]] = {}
        for obj in self._keys(self.base + "/"):
            rest = obj["Key"][len(self.base) + 1 :]
            version, _, leaf = rest.partition("/")
            if leaf:
                by_version.setdefault(version, []).append(obj)
        doomed = []
        for objs in by_version.values():
            if any(o["Key"].endswith("/manifest.json") for o in objs):
                continue
            newest = max(o["LastModified"].timestamp() for o in objs)
            if self.clock() - newest > 3600:
                doomed += [o["Key"] for o in objs]
        self._delete(doomed)

    def clear(self) -> None:
        self._kinds.clear()
        self._delete([o["Key"] for o in self._keys(self.base + "/")])
