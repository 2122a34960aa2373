"""Feature definitions as configuration: one YAML file says what is counted and fed.

A definition names the attributes the ranker sees (from the click's ``user`` and
``context`` objects and the items' attributes), the counter families (their key fields),
their decay half-lives and CTR smoothing, and which counters are also bucketized into
tokens. :func:`load` validates it and builds the :class:`~features.counters.CounterConfig`
the store keeps and the :class:`~features.rows.RowConfig` rows are built from; the
definition's canonical hash goes into the feature schema, so a learner never mixes rows
of two definitions. MovieLens ships as ``features/definitions/movielens.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from features.counters import CounterConfig, CounterSpec, half_life_label

DEFAULT = Path(__file__).resolve().parent / "definitions" / "movielens.yaml"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class Smoothing(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    prior: float = 0.5
    alpha: float = 5.0


class Counters(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    families: dict[str, Any]
    half_lives: tuple[str | float, ...] = ("1h", "1d")
    smoothing: Smoothing = Smoothing()


class Attributes(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    user: tuple[str, ...] = ()
    item: tuple[str, ...] = ()
    context: tuple[str, ...] = ()


class Model(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    bucketized: Literal["all"] | list[str] = "all"


class Document(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    counters: Counters
    version: int = 1
    attributes: Attributes = Attributes()
    model: Model = Model()


class DefinitionError(ValueError):
    """A feature definition is invalid; the message names the file and the field."""


def seconds(value: str | float, where: str) -> float:
    """A duration: seconds as a number, or ``90s``, ``30m``, ``1h``, ``7d``.

    >>> seconds("1h", "x"), seconds(90, "x"), seconds("1.5d", "x")
    (3600.0, 90.0, 129600.0)
    >>> seconds("soon", "counters.half_lives[0]")
    Traceback (most recent call last):
    ...
    features.definition.DefinitionError: counters.half_lives[0]: 'soon' is not a duration like 90s, 30m, 1h, 7d
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    else:
        m = _DURATION.match(str(value).strip())
        if not m:
            raise DefinitionError(f"{where}: {value!r} is not a duration like 90s, 30m, 1h, 7d")
        out = float(m.group(1)) * _UNITS[m.group(2)]
    if out <= 0:
        raise DefinitionError(f"{where}: a duration must be > 0, got {value!r}")
    return out


@dataclass(frozen=True)
class FeatureDefinition:
    """A validated definition and what the store and the rows are built from."""

    name: str
    version: int
    counters: CounterConfig
    user_fields: tuple[str, ...]
    item_fields: tuple[str, ...]
    context_fields: tuple[str, ...]
    bucketized: tuple[str, ...]
    digest: str
    source: str

    def row_config(self, code_fields: tuple[str, ...] = ()):
        from features.rows import RowConfig

        return RowConfig(counters=self.counters, user_fields=self.user_fields,
                         item_fields=self.item_fields, context_fields=self.context_fields,
                         code_fields=code_fields, bucket_counters=self.bucketized,
                         version=self.version, definition=f"{self.name}:{self.digest[:16]}")

    def describe(self) -> dict[str, Any]:
        """What ``headwater features list`` prints."""
        return {
            "name": self.name, "version": self.version, "source": self.source,
            "digest": self.digest,
            "attributes": {"user": list(self.user_fields), "item": list(self.item_fields),
                           "context": list(self.context_fields)},
            "counters": {s.name: list(s.key) for s in self.counters.specs},
            "half_lives": [half_life_label(h) for h in self.counters.half_lives],
            "smoothing": {"prior": self.counters.prior, "alpha": self.counters.alpha},
            "bucketized": list(self.bucketized),
        }


def parse(text: str, source: str = "<text>") -> FeatureDefinition:
    """Validate a definition's YAML text.

    >>> d = parse('''
    ... name: news
    ... attributes: {user: [country], context: [device, hour]}
    ... counters: {families: {user: [user_id], publisher: [item.publisher]}, half_lives: [30m]}
    ... ''')
    >>> d.context_fields, [s.name for s in d.counters.specs], d.counters.half_lives
    (('device', 'hour'), ['user', 'publisher'], (1800.0,))
    >>> parse("name: x\\ncounters: {families: {user: [user_idd]}}", "f.yaml")
    Traceback (most recent call last):
    ...
    features.definition.DefinitionError: f.yaml: counters.families.user: CounterSpec 'user': unknown key field 'user_idd'; use one of ('user_id', 'item_id', 'genre', 'tag', 'year', 'hour', 'weekday') or context.<f>, user.<f>, item.<f>
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{source}: not valid YAML: {exc}") from None
    try:
        doc = msgspec.convert(raw, Document)
    except msgspec.ValidationError as exc:
        raise DefinitionError(f"{source}: {exc}") from None
    specs = []
    for name, key in doc.counters.families.items():
        if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
            raise DefinitionError(f"{source}: counters.families.{name}: expected a list of key "
                                  f"fields like [user_id] or [context.device], got {key!r}")
        try:
            specs.append(CounterSpec(name, key=tuple(key)))
        except ValueError as exc:
            raise DefinitionError(f"{source}: counters.families.{name}: {exc}") from None
    half_lives = tuple(seconds(h, f"{source}: counters.half_lives[{i}]")
                       for i, h in enumerate(doc.counters.half_lives))
    try:
        counters = CounterConfig(tuple(specs), half_lives, doc.counters.smoothing.alpha,
                                 doc.counters.smoothing.prior)
    except ValueError as exc:
        raise DefinitionError(f"{source}: counters: {exc}") from None
    names = [s.name for s in specs]
    bucketized = tuple(names) if doc.model.bucketized == "all" else tuple(doc.model.bucketized)
    unknown = sorted(set(bucketized) - set(names))
    if unknown:
        raise DefinitionError(f"{source}: model.bucketized names unknown counters {unknown}; "
                              f"defined: {names}")
    fields = [*doc.attributes.user, *doc.attributes.item, *doc.attributes.context]
    clash = sorted({f for f in fields if fields.count(f) > 1} | ({"user_id", "item_id"} & set(fields)))
    if clash:
        raise DefinitionError(f"{source}: attributes: field names must be unique and not "
                              f"user_id/item_id: {clash}")
    canonical = json.dumps(msgspec.to_builtins(doc), sort_keys=True, separators=(",", ":"))
    return FeatureDefinition(doc.name, doc.version, counters, tuple(doc.attributes.user),
                             tuple(doc.attributes.item), tuple(doc.attributes.context), bucketized,
                             hashlib.sha256(canonical.encode()).hexdigest(), source)


def load(path: str | Path | None = None) -> FeatureDefinition:
    """The definition at ``path`` (default: the MovieLens one shipped with Headwater)."""
    path = Path(path) if path else DEFAULT
    try:
        text = path.read_text()
    except OSError as exc:
        raise DefinitionError(f"feature definition {path}: {exc.strerror or exc}") from None
    return parse(text, str(path))
