"""Arrow IPC codec for train batches (contract ``train-batch/1`` of docs/contracts.md).

One Kafka message on ``train-batches`` is one Arrow IPC *stream* holding one table.
The column order and types are fixed by the contract; the feature schema travels in the
Arrow schema metadata so a learner can build (or refuse) a model from the batch alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "CONTRACT",
    "TrainBatch",
    "decode_batch",
    "encode_batch",
    "encode_batches",
    "schema_fields",
]

CONTRACT = "train-batch/1"

_META_CONTRACT = "headwater.contract"
_META_SCHEMA = "headwater.feature_schema"
_META_HASH = "headwater.feature_schema_hash"
_META_TOPIC = "headwater.source_topic"
_META_PARTITION = "headwater.source_partition"
_META_START = "headwater.offset_start"
_META_END = "headwater.offset_end"
_REQUIRED_META = (
    _META_CONTRACT,
    _META_SCHEMA,
    _META_HASH,
    _META_TOPIC,
    _META_PARTITION,
    _META_START,
    _META_END,
)

# The leading columns every batch carries, with their exact Arrow types.
_FIXED: tuple[tuple[str, pa.DataType], ...] = (
    ("event_id", pa.string()),
    ("ts", pa.float64()),
    ("label", pa.int8()),
    ("offset", pa.int64()),
    ("sub", pa.int32()),
)


def schema_fields(schema_json: str) -> tuple[list[str], list[str]]:
    """Return ``(categorical, dense)`` field names, in order, from a feature-schema JSON.

    Raises ``ValueError`` when the JSON is not an object with two string lists.

    >>> schema_fields('{"categorical":["user","item"],"dense":["age"],"version":1}')
    (['user', 'item'], ['age'])
    """
    try:
        obj = json.loads(schema_json)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"feature schema is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("feature schema must be a JSON object with 'categorical' and 'dense'")
    out: list[list[str]] = []
    for key in ("categorical", "dense"):
        names = obj.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"feature schema key {key!r} must be a list of strings")
        if len(set(names)) != len(names):
            raise ValueError(f"feature schema key {key!r} has duplicate names")
        out.append(list(names))
    return out[0], out[1]


@functools.lru_cache(maxsize=16)
def _arrow_schema(schema_json: str) -> pa.Schema:
    """The contract's columns for a feature schema, without metadata."""
    return pa.schema([pa.field(n, t, nullable=False) for n, t in _column_plan(schema_json)])


@functools.lru_cache(maxsize=16)
def _column_plan(schema_json: str) -> list[tuple[str, pa.DataType]]:
    cat, dense = schema_fields(schema_json)
    plan = list(_FIXED)
    plan += [(f"c:{name}", pa.int64()) for name in cat]
    plan += [(f"d:{name}", pa.float32()) for name in dense]
    return plan


@functools.lru_cache(maxsize=16)
def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_batch(
    columns: Mapping[str, Any],
    schema_json: str,
    schema_hash: str,
    source_topic: str,
    source_partition: int,
    offset_start: int,
    offset_end: int,
) -> bytes:
    """Encode one train batch as an Arrow IPC stream.

    ``columns`` must hold exactly ``event_id, ts, label, offset, sub`` plus one
    ``c:<field>`` per categorical and one ``d:<name>`` per dense name of the schema;
    they are written in contract order whatever the mapping's order. ``offset_end`` is
    exclusive (the next source offset after the batch).

    Raises ``ValueError`` naming the offending column or argument.

    >>> import numpy as np
    >>> schema = '{"categorical":["item"],"dense":[],"version":1}'
    >>> import hashlib; h = hashlib.sha256(schema.encode()).hexdigest()
    >>> payload = encode_batch(
    ...     {"event_id": np.array(["a", "b"]), "ts": np.array([1.0, 2.0]),
    ...      "label": np.array([1, 0]), "offset": np.array([7, 7]), "sub": np.array([0, 1]),
    ...      "c:item": np.array([11, 0])},
    ...     schema, h, "clicks", 0, 7, 8)
    >>> decode_batch(payload).categorical.tolist()
    [[11], [0]]
    """
    if int(offset_end) < int(offset_start):
        raise ValueError(f"offset_end {offset_end} < offset_start {offset_start}")
    table = _table(columns, schema_json, schema_hash, source_partition)
    return _stream(table, schema_json, schema_hash, source_topic, source_partition,
                   offset_start, offset_end)


def encode_batches(
    columns: Mapping[str, Any],
    schema_json: str,
    schema_hash: str,
    source_topic: str,
    source_partition: int,
    rows_per_message: int,
) -> list[tuple[bytes, int]]:
    """Rows in offset order as train batches of at most ``rows_per_message`` rows each:
    ``(payload, rows)`` per batch, each exactly what :func:`encode_batch` writes for its
    rows and their offset range (first offset, last + 1): the same table and metadata
    (the bytes may differ: a slice's buffers are written as they lie).

    The columns are checked and converted to Arrow once for all the batches, which
    then write slices of one table (a take's rows cost one conversion per column, not
    one per column and message).

    >>> import numpy as np
    >>> schema = '{"categorical":["item"],"dense":[],"version":1}'
    >>> import hashlib; h = hashlib.sha256(schema.encode()).hexdigest()
    >>> cols = {"event_id": np.array(["a", "b", "c"]), "ts": np.array([1.0, 2.0, 3.0]),
    ...         "label": np.array([1, 0, 1]), "offset": np.array([7, 7, 9]),
    ...         "sub": np.array([0, 1, 0]), "c:item": np.array([11, 0, 5])}
    >>> out = encode_batches(cols, schema, h, "clicks", 0, 2)
    >>> [(b.offset_start, b.offset_end, b.categorical.ravel().tolist(), n)
    ...  for b, n in ((decode_batch(p), n) for p, n in out)]
    [(7, 8, [11, 0], 2), (9, 10, [5], 1)]
    >>> alone = encode_batch({k: v[2:] for k, v in cols.items()}, schema, h, "clicks", 0, 9, 10)
    >>> decode_batch(out[1][0]).table.equals(decode_batch(alone).table, check_metadata=True)
    True
    """
    if rows_per_message < 1:
        raise ValueError(f"rows_per_message must be >= 1, got {rows_per_message}")
    table = _table(columns, schema_json, schema_hash, source_partition)
    offsets = np.asarray(columns["offset"])
    out: list[tuple[bytes, int]] = []
    for start in range(0, table.num_rows, rows_per_message):
        part = offsets[start:start + rows_per_message]
        out.append((_stream(table.slice(start, rows_per_message), schema_json, schema_hash,
                            source_topic, source_partition, int(part.min()), int(part.max()) + 1),
                    len(part)))
    return out


def _table(columns: Mapping[str, Any], schema_json: str, schema_hash: str,
           source_partition: int) -> pa.Table:
    """The columns checked and converted to the contract's Arrow types, in its order."""
    plan = _column_plan(schema_json)
    if schema_hash != _sha256_hex(schema_json):
        raise ValueError("schema_hash is not the sha256 hex of schema_json")
    expected = [name for name, _ in plan]
    missing = [n for n in expected if n not in columns]
    extra = [n for n in columns if n not in set(expected)]
    if missing or extra:
        raise ValueError(f"train batch columns: missing {missing}, unexpected {extra}")
    if int(source_partition) < 0:
        raise ValueError(f"source_partition must be >= 0, got {source_partition}")

    arrays: list[pa.Array] = []
    n_rows: int | None = None
    for name, typ in plan:
        values = columns[name]
        try:
            if name == "event_id":
                arr = pa.array([str(v) for v in values], type=typ)
            else:
                np_values = np.asarray(values)
                if np_values.ndim != 1:
                    raise ValueError("must be one-dimensional")
                arr = pa.array(np_values.astype(typ.to_pandas_dtype(), copy=False), type=typ)
        except (TypeError, ValueError, pa.ArrowException) as exc:
            raise ValueError(f"train batch column {name!r}: {exc}") from None
        if n_rows is None:
            n_rows = len(arr)
        elif len(arr) != n_rows:
            raise ValueError(f"train batch column {name!r} has {len(arr)} rows, expected {n_rows}")
        arrays.append(arr)
    _check_labels(arrays[2].to_numpy(zero_copy_only=False))
    return pa.Table.from_arrays(arrays, schema=_arrow_schema(schema_json))


def _stream(table: pa.Table, schema_json: str, schema_hash: str, source_topic: str,
            source_partition: int, offset_start: int, offset_end: int) -> bytes:
    """One Arrow IPC stream of ``table``, its provenance in the schema metadata."""
    metadata = {
        _META_CONTRACT: CONTRACT,
        _META_SCHEMA: schema_json,
        _META_HASH: schema_hash,
        _META_TOPIC: str(source_topic),
        _META_PARTITION: str(int(source_partition)),
        _META_START: str(int(offset_start)),
        _META_END: str(int(offset_end)),
    }
    table = table.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _check_labels(labels: np.ndarray) -> None:
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("train batch column 'label' must hold only 0 and 1")


@dataclass(frozen=True)
class TrainBatch:
    """A decoded train batch: the Arrow table, its provenance and numpy views.

    ``categorical`` is int64 ``[n, F]`` and ``dense`` float32 ``[n, D]`` in schema order;
    ``offsets``/``subs`` identify each row at its source so the learner can dedup.
    """

    table: pa.Table
    schema_json: str
    schema_hash: str
    source_topic: str
    source_partition: int
    offset_start: int
    offset_end: int
    categorical_fields: list[str]
    dense_names: list[str]
    categorical: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    subs: np.ndarray
    event_ids: np.ndarray
    ts: np.ndarray
    meta: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _meta_int(meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise ValueError(f"train batch metadata {key!r} is not an integer: {meta[key]!r}") from None


def decode_batch(payload: bytes) -> TrainBatch:
    """Decode and validate one train batch produced by :func:`encode_batch`.

    Checks, in order: a readable Arrow IPC stream, every contract metadata key, the
    contract version, the schema hash, then column presence, order and types. Any
    failure raises ``ValueError`` naming the key or column.
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(payload))
        table = reader.read_all()
    except (pa.ArrowException, TypeError, OSError) as exc:
        raise ValueError(f"train batch is not an Arrow IPC stream: {exc}") from None
    raw_meta = table.schema.metadata or {}
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw_meta.items()}
    for key in _REQUIRED_META:
        if key not in meta:
            raise ValueError(f"train batch metadata key {key!r} is missing")
    if meta[_META_CONTRACT] != CONTRACT:
        raise ValueError(
            f"train batch metadata {_META_CONTRACT!r} is {meta[_META_CONTRACT]!r}, "
            f"this learner reads {CONTRACT!r}"
        )
    schema_json = meta[_META_SCHEMA]
    if meta[_META_HASH] != _sha256_hex(schema_json):
        raise ValueError(f"train batch metadata {_META_HASH!r} does not match the feature schema")
    plan = _column_plan(schema_json)
    names = table.column_names
    expected = [n for n, _ in plan]
    if names != expected:
        missing = [n for n in expected if n not in names]
        extra = [n for n in names if n not in set(expected)]
        which = missing or extra or [a for a, b in zip(names, expected, strict=True) if a != b]
        raise ValueError(
            f"train batch columns {which} wrong (missing {missing}, unexpected {extra}); "
            f"expected order {expected}"
        )
    for name, typ in plan:
        col = table.column(name)
        if col.type != typ:
            raise ValueError(f"train batch column {name!r} has type {col.type}, expected {typ}")
        if col.null_count:
            raise ValueError(f"train batch column {name!r} has {col.null_count} nulls")

    cat_names, dense_names = schema_fields(schema_json)
    n = table.num_rows
    categorical = _stack(table, [f"c:{c}" for c in cat_names], np.int64, n)
    dense = _stack(table, [f"d:{d}" for d in dense_names], np.float32, n)
    labels = table.column("label").to_numpy()
    _check_labels(labels)
    return TrainBatch(
        table=table,
        schema_json=schema_json,
        schema_hash=meta[_META_HASH],
        source_topic=meta[_META_TOPIC],
        source_partition=_meta_int(meta, _META_PARTITION),
        offset_start=_meta_int(meta, _META_START),
        offset_end=_meta_int(meta, _META_END),
        categorical_fields=cat_names,
        dense_names=dense_names,
        categorical=categorical,
        dense=dense,
        labels=labels,
        offsets=table.column("offset").to_numpy(),
        subs=table.column("sub").to_numpy(),
        event_ids=table.column("event_id").to_numpy(zero_copy_only=False),
        ts=table.column("ts").to_numpy(),
        meta=meta,
    )


def _stack(table: pa.Table, names: Sequence[str], dtype: type, n: int) -> np.ndarray:
    out = np.empty((n, len(names)), dtype=dtype)
    for j, name in enumerate(names):
        out[:, j] = table.column(name).to_numpy()
    return out
