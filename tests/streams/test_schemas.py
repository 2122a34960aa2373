"""Event decoding: good events pass, every bad one is refused with a reason naming the field."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.schemas import ClickEvent, ItemEvent, decode_message

GOOD = {"event_id": "e1", "ts": 880_000_000.0, "user_id": "u1", "item_id": "i1", "label": 1}


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


def test_single_event_decodes_with_unknown_fields_kept_out_of_the_way():
    d = decode_message(enc({**GOOD, "extra": {"a": 1}}), ClickEvent)
    assert d.errors == [] and d.subs == [0]
    assert d.events[0].item_id == "i1" and d.events[0].label == 1


def test_envelope_with_one_bad_event_keeps_the_good_ones():
    batch = [GOOD, {**GOOD, "event_id": "e2", "label": "yes"}, {**GOOD, "event_id": "e3"}]
    d = decode_message(enc(batch), ClickEvent)
    assert [e.event_id for e in d.events] == ["e1", "e3"]
    assert d.subs == [0, 2]
    (index, raw, reason), = d.errors
    assert index == 1 and json.loads(raw)["event_id"] == "e2"
    assert "label" in reason and "clicks[1]" in reason


def test_json_lines_envelope():
    payload = b"\n".join(enc({**GOOD, "event_id": f"e{i}"}) for i in range(3))
    d = decode_message(payload, ClickEvent)
    assert [e.event_id for e in d.events] == ["e0", "e1", "e2"] and not d.errors


def reason_of(obj_or_bytes) -> str:
    payload = obj_or_bytes if isinstance(obj_or_bytes, bytes) else enc(obj_or_bytes)
    d = decode_message(payload, ClickEvent, max_bytes=10_000, now=900_000_000.0)
    assert not d.events
    assert len(d.errors) == 1
    return d.errors[0][2]


def test_bad_inputs_name_what_was_wrong():
    assert "ts" in reason_of({k: v for k, v in GOOD.items() if k != "ts"})
    assert "label" in reason_of({**GOOD, "label": 2})
    assert "label" in reason_of({**GOOD, "label": "1"})
    assert "user_id" in reason_of({**GOOD, "user_id": ""})
    assert "user_id" in reason_of({**GOOD, "user_id": True})
    assert "future" in reason_of({**GOOD, "ts": 900_000_000.0 + 10 * 86_400})
    assert "1990" in reason_of({**GOOD, "ts": 5.0})
    assert "ts" in reason_of(enc(GOOD).replace(b"880000000.0", b"1e400"))
    assert "JSON" in reason_of(enc(GOOD).replace(b"880000000.0", b"NaN"))
    assert "JSON" in reason_of(b"\xff\xfe\x00garbage")
    assert "JSON" in reason_of(b'{"event_id": "e1", "ts": 8')
    assert "exceeds the limit" in reason_of(b"[" + b" " * 20_000 + b"]")
    assert "context" in reason_of({**GOOD, "context": {"x": [1, 2]}})


def test_item_event_vectors_must_be_finite():
    d = decode_message(enc({"item_id": 7, "ts": 880_000_000, "vectors": {"img": [1.0, 2.0]}}), ItemEvent)
    assert d.events and d.events[0].vectors["img"] == [1.0, 2.0]
    bad = enc({"item_id": 7, "ts": 880_000_000, "vectors": {"img": [1.0]}}).replace(b"1.0", b"1e999")
    d = decode_message(bad, ItemEvent)
    assert not d.events and "vectors" in d.errors[0][2]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(payload):
    d = decode_message(payload, ClickEvent, max_bytes=200)
    assert len(d.events) + len(d.errors) >= 1 or payload.strip() in (b"", b"[]")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(GOOD) + ["context", "user", "zz"]), json_values, max_size=8))
def test_arbitrary_json_objects_are_accepted_or_refused_with_a_reason(obj):
    d = decode_message(msgspec.json.encode(obj), ClickEvent)
    assert len(d.events) + len(d.errors) == 1
    for _, _, reason in d.errors:
        assert reason.startswith("clicks[0]: ") and len(reason) > len("clicks[0]: ")
