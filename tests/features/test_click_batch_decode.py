"""The click path's batch decoder gives exactly what per-message decoding gives.

(It lives in ``streams.schemas``; the test sits here beside the other click-path
fast-path tests.)
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.schemas import ClickEvent, click_columns, decode_clicks, decode_message

GOOD = {"event_id": "e1", "ts": 880_000_000.0, "user_id": "u1", "item_id": 7, "label": 1}
NOW = 900_000_000.0

bad_values = st.sampled_from(
    [
        ("label", 2),
        ("label", "1"),
        ("user_id", ""),
        ("user_id", True),
        ("item_id", "x" * 300),
        ("ts", 5.0),
        ("ts", NOW + 10 * 86_400),
        ("event_id", None),
        ("context", {"x": [1]}),
        ("label", 10**30),
    ]
)
events = st.one_of(
    st.builds(
        lambda i, u: {**GOOD, "event_id": f"e{i}", "user_id": u, "user": {"age": i}},
        st.integers(0, 99),
        st.sampled_from(["u1", 2, "u3"]),
    ),
    st.builds(lambda kv: {**GOOD, kv[0]: kv[1]}, bad_values),
)


def _message(evs, kind):
    if kind == "single":
        return json.dumps(evs[0]).encode()
    if kind == "lines":
        return b"\n".join(json.dumps(e).encode() for e in evs)
    return json.dumps(evs).encode()


messages = st.one_of(
    st.tuples(
        st.lists(events, min_size=1, max_size=4), st.sampled_from(["single", "envelope", "lines"])
    ).map(lambda t: _message(*t)),
    st.sampled_from(
        [
            b"",
            b"not json",
            b'{"event_id": "e1", "ts": 8',
            b"[]",
            b"  " + json.dumps(GOOD).encode(),
            json.dumps(GOOD).encode() + b"," + json.dumps(GOOD).encode(),
            b"\xff\xfe",
        ]
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6))
def test_batch_decode_equals_per_message_decode(payloads):
    got = decode_clicks(payloads, max_bytes=2000, now=NOW)
    want_events, want_msg, want_sub, want_errors = [], [], [], []
    for m, p in enumerate(payloads):
        d = decode_message(p, ClickEvent, 2000, NOW)
        want_events += d.events
        want_msg += [m] * len(d.events)
        want_sub += d.subs
        want_errors += [(m, i, raw, reason) for i, raw, reason in d.errors]
    want = click_columns(want_events)
    assert got.message.tolist() == want_msg and got.sub.tolist() == want_sub
    assert sorted(got.errors) == sorted(want_errors)
    for k, v in want.items():
        g = got.columns[k]
        assert (g.tolist() if hasattr(g, "tolist") else g) == (
            v.tolist() if hasattr(v, "tolist") else v
        ), k
