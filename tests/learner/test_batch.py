import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from learner.batch import decode_batch, encode_batch, encode_batches
from tests.learner.synth import SCHEMA_HASH, SCHEMA_JSON, make_payload, synthetic_columns


def test_round_trip_keeps_values_order_and_provenance():
    cols = synthetic_columns(10, offset=100, seed=1)
    payload = encode_batch(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 3, 100, 110)
    tb = decode_batch(payload)
    assert tb.table.column_names == [
        "event_id",
        "ts",
        "label",
        "offset",
        "sub",
        "c:user",
        "c:item",
        "c:ctx",
        "d:x",
    ]
    assert (tb.source_topic, tb.source_partition, tb.offset_start, tb.offset_end) == (
        "clicks",
        3,
        100,
        110,
    )
    assert tb.schema_json == SCHEMA_JSON and tb.schema_hash == SCHEMA_HASH
    assert tb.categorical.dtype == np.int64 and tb.categorical.shape == (10, 3)
    np.testing.assert_array_equal(tb.categorical[:, 1], cols["c:item"])
    assert tb.dense.dtype == np.float32 and tb.dense.shape == (10, 1)
    np.testing.assert_array_equal(tb.dense[:, 0], cols["d:x"])
    np.testing.assert_array_equal(tb.labels, cols["label"])
    np.testing.assert_array_equal(tb.offsets, cols["offset"])
    assert tb.event_ids.tolist() == cols["event_id"].tolist()
    assert len(tb) == 10


def test_a_take_in_many_batches_is_each_batch_encoded_alone():
    cols = synthetic_columns(1000, offset=50, seed=2)
    cols["offset"] = 50 + np.arange(1000) // 7  # several events per source message
    out = encode_batches(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 2, 256)
    assert [n for _, n in out] == [256, 256, 256, 232]
    for k, (payload, n) in enumerate(out):
        part = {name: col[256 * k:256 * k + n] for name, col in cols.items()}
        alone = decode_batch(encode_batch(part, SCHEMA_JSON, SCHEMA_HASH, "clicks", 2,
                                          int(part["offset"][0]), int(part["offset"][-1]) + 1))
        got = decode_batch(payload)
        assert got.table.equals(alone.table, check_metadata=True)
        assert (got.offset_start, got.offset_end) == (alone.offset_start, alone.offset_end)
    assert encode_batches({k: v[:0] for k, v in cols.items()}, SCHEMA_JSON, SCHEMA_HASH,
                          "clicks", 2, 256) == []
    bad = dict(cols, label=np.full(1000, 2))
    with pytest.raises(ValueError, match="label"):
        encode_batches(bad, SCHEMA_JSON, SCHEMA_HASH, "clicks", 2, 256)
    with pytest.raises(ValueError, match="rows_per_message"):
        encode_batches(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 2, 0)


def test_encode_refuses_missing_extra_and_ragged_columns():
    cols = synthetic_columns(4, 0, 0)
    del cols["c:ctx"]
    with pytest.raises(ValueError, match="c:ctx"):
        encode_batch(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 0, 0, 4)
    cols = synthetic_columns(4, 0, 0) | {"c:other": np.zeros(4)}
    with pytest.raises(ValueError, match="c:other"):
        encode_batch(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 0, 0, 4)
    cols = synthetic_columns(4, 0, 0)
    cols["ts"] = cols["ts"][:3]
    with pytest.raises(ValueError, match="'ts'"):
        encode_batch(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 0, 0, 4)
    cols = synthetic_columns(4, 0, 0)
    cols["label"] = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match="label"):
        encode_batch(cols, SCHEMA_JSON, SCHEMA_HASH, "clicks", 0, 0, 4)
    with pytest.raises(ValueError, match="schema_hash"):
        encode_batch(synthetic_columns(4, 0, 0), SCHEMA_JSON, "0" * 64, "clicks", 0, 0, 4)


def _rewrite(payload: bytes, table_fn=None, meta_fn=None) -> bytes:
    table = pa.ipc.open_stream(payload).read_all()
    meta = dict(table.schema.metadata)
    if meta_fn:
        meta = meta_fn(meta)
    if table_fn:
        table = table_fn(table)
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize(
    "table_fn, meta_fn, needle",
    [
        (
            None,
            lambda m: {k: v for k, v in m.items() if k != b"headwater.offset_end"},
            "offset_end",
        ),
        (None, lambda m: m | {b"headwater.contract": b"train-batch/9"}, "train-batch/9"),
        (None, lambda m: m | {b"headwater.feature_schema_hash": b"f" * 64}, "feature_schema_hash"),
        (None, lambda m: m | {b"headwater.source_partition": b"x"}, "source_partition"),
        (lambda t: t.drop_columns(["c:item"]), None, "c:item"),
        (lambda t: t.set_column(1, "ts", t.column("ts").cast(pa.float32())), None, "'ts'"),
        (lambda t: t.set_column(5, "c:user", t.column("c:user").cast(pa.int32())), None, "c:user"),
    ],
)
def test_decode_refuses_bad_payloads_naming_the_problem(table_fn, meta_fn, needle):
    bad = _rewrite(make_payload(8), table_fn, meta_fn)
    with pytest.raises(ValueError, match=needle):
        decode_batch(bad)


def test_decode_refuses_garbage():
    with pytest.raises(ValueError, match="Arrow IPC"):
        decode_batch(b"not arrow at all")


def test_empty_schema_fields_and_empty_batch():
    schema = json.dumps({"categorical": [], "dense": [], "version": 1})
    h = hashlib.sha256(schema.encode()).hexdigest()
    cols = {
        "event_id": np.array([], dtype=str),
        "ts": np.array([]),
        "label": np.array([], dtype=np.int8),
        "offset": np.array([], dtype=np.int64),
        "sub": np.array([], dtype=np.int32),
    }
    tb = decode_batch(encode_batch(cols, schema, h, "clicks", 0, 5, 5))
    assert tb.categorical.shape == (0, 0) and len(tb) == 0
