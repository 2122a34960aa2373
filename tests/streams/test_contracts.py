"""The events' JSON Schemas (docs/schemas/) match the code and agree with the decoder."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import msgspec
import pytest

from features.movielens import click_events, load_movielens
from streams.contracts import EVENT_TYPES, all_schemas
from streams.deadletter import dead_letter
from streams.schemas import ClickEvent, decode_message

REPO = Path(__file__).resolve().parent.parent.parent
CORPUS = REPO / "tests" / "corpus"
#: corpus cases a JSON Schema cannot express: bytes that are not JSON text, non-finite
#: numbers (not JSON), and "more than a day in the future" (relative to the receiver's clock)
NOT_SCHEMA = {"malformed_json.bin", "binary_garbage.bin", "non_utf8.bin", "nan_ts.bin", "inf_ts.bin",
              "neg_inf_in_context.bin", "future_ts.bin"}


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((REPO / "docs" / "schemas" / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(EVENT_TYPES))
def test_schema_files_are_generated_from_the_code(name):
    on_disk = json.loads((REPO / "docs" / "schemas" / f"{name}.schema.json").read_text())
    assert on_disk == all_schemas()[name], "stale: run python scripts/contracts.py"


def test_every_movielens_click_the_decoder_accepts_validates(data_dir):
    check = validator("click-event")
    events = list(click_events(load_movielens(data_dir / "ml-100k")))[:5000]
    payload = json.dumps(events).encode()
    decoded = decode_message(payload, ClickEvent)
    assert len(decoded.events) == len(events) and not decoded.errors
    for event in events:
        check.validate(event)


@pytest.mark.parametrize("case", [c for c in json.loads((CORPUS / "bad_clicks.json").read_text())["cases"]
                                  if c["file"] not in NOT_SCHEMA], ids=lambda c: c["file"])
def test_the_schema_refuses_what_the_decoder_refuses(case):
    check = validator("click-event")
    payload = (CORPUS / case["file"]).read_bytes().strip()
    if payload.startswith(b"["):
        texts = [json.dumps(e).encode() for e in json.loads(payload)]
    else:
        texts = [line for line in payload.splitlines() if line.strip()]
    decoded = decode_message(payload, ClickEvent)
    refused = {index for index, _raw, _reason in decoded.errors}
    for index, text in enumerate(texts):
        try:
            event = json.loads(text)
        except json.JSONDecodeError:  # not JSON at all: no schema applies, the decoder refuses
            assert index in refused
            continue
        assert check.is_valid(event) == (index not in refused), (index, event)


def test_a_dead_letter_record_validates():
    record = json.loads(dead_letter("clicks[0]: $.label must be 0 or 1", "clicks", 1, 7, b"{}", 0))
    validator("dead-letter").validate(record)
    record.pop("reason")
    assert not validator("dead-letter").is_valid(record)


def test_item_events_validate():
    check = validator("item-event")
    check.validate({"item_id": "50", "ts": time.time(), "text": "Star Wars (1977)", "tags": ["Sci-Fi"]})
    assert not check.is_valid({"item_id": "", "ts": time.time()})


def test_action_events_schema_and_decoder_agree():
    from streams.schemas import ActionEvent

    check = validator("action-event")
    now = time.time()
    cases = [
        ({"event_id": "a1", "ts": now, "user_id": 7, "item_id": "50", "request_id": "r" * 32}, True),
        ({"event_id": "a2", "ts": now, "user_id": "7", "item_id": 50}, True),
        ({"event_id": "a3", "ts": now, "user_id": "7", "item_id": 50, "action": "buy"}, False),
        ({"event_id": "a4", "ts": now, "user_id": "", "item_id": 50}, False),
        ({"event_id": "a5", "ts": now, "item_id": 50}, False),
        ({"event_id": "a6", "ts": 1.0, "user_id": "7", "item_id": 50}, False),
    ]
    for event, ok in cases:
        decoded = decode_message(json.dumps(event).encode(), ActionEvent)
        assert check.is_valid(event) == ok == (not decoded.errors), (event, decoded.errors)


def test_what_serving_logs_validates_as_an_impression():
    import numpy as np

    from serving.impressions import encode_impression, impression_record
    from streams.schemas import ImpressionEvent, impression_rows

    # what goes on the wire: the record as serving encodes it
    record = json.loads(encode_impression(impression_record(
        "0" * 32, "u1", ["a", 2], np.array([0.5, 0.25]), np.array([[1, 2], [3, 4]]),
        np.array([[0.5], [1.5]], np.float32), time.time(), "000003", "h" * 64)))
    validator("impression-event").validate(record)
    decoded = decode_message(json.dumps(record).encode(), ImpressionEvent)
    assert not decoded.errors
    cat, dense = impression_rows(decoded.events[0])
    assert cat.tolist() == [[1, 2], [3, 4]] and dense.tolist() == [[0.5], [1.5]]
    record["candidates"] = []
    assert not validator("impression-event").is_valid(record)
    assert decode_message(json.dumps(record).encode(), ImpressionEvent).errors


def _impression(categorical, dense, positions=(0, 1)) -> dict:
    return {"request_id": "r1", "ts": time.time(), "user_id": "u1", "model_version": "000003",
            "schema_hash": "h" * 64, "categorical": categorical, "dense": dense,
            "candidates": [{"item_id": f"i{p}", "position": p, "score": 0.5} for p in positions]}


def _b64(matrix, dtype) -> str:
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(matrix, dtype).tobytes()).decode()


def test_impression_rows_as_lists_and_as_bytes_are_the_same_rows():
    from streams.schemas import ImpressionEvent, impression_rows

    cat, dense = [[1, -(2**63)], [2**63 - 1, 0]], [[0.5, -1.25], [3.0, 1e-3]]
    as_lists = _impression(cat, dense)
    as_bytes = _impression(_b64(cat, "<i8"), _b64(dense, "<f4"))
    rows = []
    for record in (as_lists, as_bytes):
        validator("impression-event").validate(record)
        decoded = decode_message(json.dumps(record).encode(), ImpressionEvent)
        assert not decoded.errors, decoded.errors
        rows.append(impression_rows(decoded.events[0]))
    assert rows[0][0].tolist() == rows[1][0].tolist() == cat
    assert rows[0][1].tolist() == rows[1][1].tolist()
    assert rows[1][1].dtype.name == "float32" and rows[1][0].dtype.name == "int64"
    assert not validator("impression-event").is_valid(_impression("not base64!", dense))


def test_decoding_impressions_hands_over_the_rows_it_checked():
    """The joiner takes each impression's rows from the decode that validated them
    (``Decoded.derived``), not from a second base64 decode."""
    from streams.schemas import ActionEvent, ImpressionEvent, impression_rows

    records = [_impression(_b64([[1, 2], [3, 4]], "<i8"), _b64([[0.5], [1.5]], "<f4")),
               _impression("not base64!", [[0.5], [1.5]]),
               _impression([[5, 6], [7, 8]], [[2.5], [3.5]])]
    decoded = decode_message(json.dumps(records).encode(), ImpressionEvent)
    assert decoded.subs == [0, 2] and len(decoded.derived) == 2
    for ev, (cat, dense) in zip(decoded.events, decoded.derived, strict=True):
        want_cat, want_dense = impression_rows(ev)
        assert cat.tolist() == want_cat.tolist() and dense.tolist() == want_dense.tolist()
        assert cat.dtype.name == "int64" and dense.dtype.name == "float32"
    action = {"event_id": "a1", "ts": time.time(), "user_id": "u1", "item_id": "i1",
              "action": "click"}
    assert decode_message(json.dumps(action).encode(), ActionEvent).derived == [None]


@pytest.mark.parametrize(("categorical", "dense", "positions", "reason"), [
    ("not base64!", [[0.5], [1.5]], (0, 1), "$.categorical is not base64"),
    (_b64([[1, 2], [3, 4]], "<i8")[:-4], [[0.5], [1.5]], (0, 1), "$.categorical holds 30 bytes: not 2 rows of int64"),
    ([[1, 2], [3, 4]], _b64([[0.5], [float("nan")]], "<f4"), (0, 1), "$.dense[1] holds a non-finite"),
    ([[1, 2], [3]], [[0.5], [1.5]], (0, 1), "$.categorical: rows of unequal length"),
    ([[1, 2]], [[0.5], [1.5]], (0, 1), "$.categorical needs one row per candidate (2), has 1"),
    ([[2**63, 2], [3, 4]], [[0.5], [1.5]], (0, 1), "$.categorical holds a token outside int64"),
    ([[1, 2], [3, 4]], [[0.5], [1.5]], (0, 2), "$.candidates[1].position=2 names no row"),
])
def test_bad_impression_rows_are_refused_naming_the_field(categorical, dense, positions, reason):
    from streams.schemas import ImpressionEvent

    decoded = decode_message(json.dumps(_impression(categorical, dense, positions)).encode(),
                             ImpressionEvent)
    assert not decoded.events
    assert len(decoded.errors) == 1 and reason in decoded.errors[0][2], decoded.errors


@pytest.mark.parametrize(("candidate", "reason"), [
    (("", 1, 0.5), "$.candidates[1].item_id must be a non-empty string"),
    (("x" * 257, 1, 0.5), "$.candidates[1].item_id must be a non-empty string"),
    ((True, 1, 0.5), "$.candidates[1].item_id must be a string or integer, got bool"),
    (("b", 1, float("nan")), "$.candidates[1].score holds a non-finite number"),
    (("b", -1, 0.5), "$.candidates[1].position=-1 names no row"),
    (("b", 3, 0.5), "$.candidates[1].position=3 names no row"),
])
def test_a_bad_candidate_is_refused_naming_it(candidate, reason):
    from streams.schemas import ImpressionEvent, InvalidEvent, Shown, validate_impression

    good = ImpressionEvent("r1", time.time(), "u1", "3", "h" * 64,
                           [Shown("a", 0, 0.5), Shown(*candidate), Shown("c", 2, 0.25)],
                           [[1], [2], [3]], [[0.5], [1.5], [2.5]])
    with pytest.raises(InvalidEvent, match=re.escape(reason)):
        validate_impression(good)
    ok = msgspec.structs.replace(good, candidates=[Shown("a", 0, 0.5), Shown(7, 1, 0.5),
                                                   Shown("c", 2, 0.25)])
    assert validate_impression(ok) is ok

