"""The bad-input corpus (tests/corpus): every bad event refused with a reason naming what
was wrong, good events beside it kept — first in the decoder, then through a real worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaProducer

from streams.schemas import ClickEvent, decode_message
from tests.stackutil import read_json_topic, train_event_ids, wait_until

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
SPEC = json.loads((CORPUS / "bad_clicks.json").read_text())
CASES = SPEC["cases"]
LIMIT = SPEC["max_message_bytes"]


def oversized() -> bytes:
    one = json.dumps({"event_id": "big", "ts": 880000000, "user_id": "u", "item_id": "i", "label": 1})
    return ("[" + ",".join([one] * (LIMIT // len(one) + 10)) + "]").encode()


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_decoder_refuses_each_corpus_case_with_a_reason(case):
    payload = (CORPUS / case["file"]).read_bytes()
    decoded = decode_message(payload, ClickEvent, LIMIT)
    assert len(decoded.events) == case["good_events"]
    assert len(decoded.errors) == case["bad_events"]
    assert case["reason_contains"] in decoded.errors[0][2], decoded.errors[0][2]


def test_oversized_message_is_refused_whole():
    decoded = decode_message(oversized(), ClickEvent, LIMIT)
    assert not decoded.events
    assert "exceeds the limit" in decoded.errors[0][2]


@pytest.mark.integration
def test_corpus_through_the_worker(worker):
    kafka, prefix = worker["kafka"], worker["prefix"]
    producer = KafkaProducer(bootstrap_servers=kafka, max_request_size=16 << 20)
    topic = f"{prefix}clicks"
    for case in CASES:
        producer.send(topic, (CORPUS / case["file"]).read_bytes(), partition=3)
    producer.send(topic, oversized(), partition=3)
    marker = {"event_id": "after-the-corpus", "ts": 880000000, "user_id": "u", "item_id": "i", "label": 0}
    producer.send(topic, json.dumps(marker).encode(), partition=3)
    producer.flush()
    producer.close()

    # The worker survived the corpus: the event after it arrives, once.
    ids = wait_until(lambda: (r := train_event_ids(kafka, f"{prefix}train-batches")) and "after-the-corpus" in r and r, 90,
                     what="the event after the corpus", on_fail=worker["svc"].log)
    assert ids.count("after-the-corpus") == 1
    good_ids = {"g1", "g3", "g4", "g6"}
    assert good_ids <= set(ids)

    expected_dead = sum(c["bad_events"] for c in CASES) + 1
    dead = wait_until(lambda: (d := [x for x in read_json_topic(kafka, f"{prefix}dead-letter")
                                     if x["source_topic"] == topic and x["partition"] == 3])
                      and len(d) >= expected_dead and d, 60, what="all dead letters")
    assert len(dead) == expected_dead
    reasons = [d["reason"] for d in dead]
    for case in CASES:
        assert any(case["reason_contains"] in r for r in reasons), case
