"""The feature schema: which categorical fields and dense features a row carries.

The learner builds its model from the schema of the first batch it sees and refuses
batches (and serving refuses checkpoints) whose hash differs, so the JSON form is
canonical: sorted keys, no spaces, lists in field order (docs/contracts.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

__all__ = ["FeatureSchema"]


@dataclass(frozen=True)
class FeatureSchema:
    """Ordered categorical field names, dense feature names and a version.

    Examples
    --------
    >>> s = FeatureSchema(categorical=["user_id", "item_id"], dense=["user_ctr"])
    >>> s.to_json()
    '{"categorical":["user_id","item_id"],"dense":["user_ctr"],"version":1}'
    >>> FeatureSchema.from_json(s.to_json()) == s, len(s.hash)
    (True, 64)
    """

    categorical: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    version: int = 1
    #: ``name:digest`` of the feature definition the rows follow (features/definition.py);
    #: part of the JSON (and so of the hash) only when set.
    definition: str | None = None

    def __post_init__(self) -> None:
        # Copy, so a caller mutating its own list later cannot change a schema whose hash
        # has already been taken.
        object.__setattr__(self, "categorical", list(self.categorical))
        object.__setattr__(self, "dense", list(self.dense))
        for kind in ("categorical", "dense"):
            names = getattr(self, kind)
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"FeatureSchema.{kind}: names must be non-empty strings")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"FeatureSchema.{kind}: duplicate names {dupes}")
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"FeatureSchema.version must be an int >= 1, got {self.version!r}")

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace."""
        doc: dict = {"categorical": self.categorical, "dense": self.dense, "version": self.version}
        if self.definition is not None:
            doc["definition"] = self.definition
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """sha256 hex of :meth:`to_json`; checkpoints and train batches carry it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes) -> FeatureSchema:
        """Parse the JSON written by :meth:`to_json` (or any equivalent JSON object)."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"feature schema is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or not {"categorical", "dense"} <= obj.keys():
            raise ValueError("feature schema JSON needs an object with 'categorical' and 'dense'")
        return cls(
            categorical=list(obj["categorical"]),
            dense=list(obj["dense"]),
            version=int(obj.get("version", 1)),
            definition=obj.get("definition"),
        )

    @property
    def columns(self) -> list[str]:
        """Train-batch column names after the fixed ones: ``c:<field>``…, ``d:<name>``…."""
        return [f"c:{n}" for n in self.categorical] + [f"d:{n}" for n in self.dense]
