"""Audit logs through the real pipeline: ship-audit → broker → worker → alerts."""

from __future__ import annotations

import base64
import json

import pytest
from kafka import KafkaProducer

from core.settings import Settings
from streams.audit_shipper import ship_audit
from tests.stackutil import alerts_in_redis, read_json_topic, wait_until

pytestmark = pytest.mark.integration


def _alerts(redis_url: str, host: str) -> list[dict]:
    return alerts_in_redis(redis_url, host, "medium")


def test_shipped_attack_log_raises_one_growing_alert(worker, data_dir, tmp_path, redis_url):
    kafka, prefix = worker["kafka"], worker["prefix"]
    log = data_dir / "audit" / "dev03_ingress_revshell.log"
    labels = json.loads((data_dir / "audit" / "dev03_ingress_revshell.labels.json").read_text())
    settings = Settings(topic_prefix=prefix)
    shipped = ship_audit(settings, kafka, log, "vm-dev03", tmp_path / "pos", follow=False)
    assert shipped == len(log.read_bytes().splitlines())

    labelled = {t["id"] if isinstance(t, dict) else t for t in labels["attack_techniques"]}

    def grown():
        # The alert grows while the worker works through the log: wait for the whole chain.
        alerts = _alerts(redis_url, "vm-dev03")
        best = max(alerts, key=lambda a: len(set(a["techniques"]) & labelled), default=None)
        return best if best and len(set(best["techniques"]) & labelled) >= 0.8 * len(labelled) else None

    top = wait_until(grown, 90, what="an alert with the labelled techniques",
                     on_fail=lambda: json.dumps(_alerts(redis_url, "vm-dev03"))[:3000])
    assert top["severity"] in ("high", "critical")
    root_pid = labels["attacker_process_tree_roots"][0]["pid"]
    assert str(root_pid) in json.dumps(top["chain"])

    # The alerts topic carries the updates of the same alert id, not one alert per event.
    on_topic = wait_until(lambda: [a for a in read_json_topic(kafka, f"{prefix}alerts")
                                   if a["host"] == "vm-dev03"], 30, what="alerts on the topic")
    assert top["id"] in {a["id"] for a in on_topic}
    assert len({a["id"] for a in on_topic if a["severity"] in ("high", "critical")}) <= 3

    # Shipping again resumes from the saved position: nothing new is sent.
    assert ship_audit(settings, kafka, log, "vm-dev03", tmp_path / "pos", follow=False) == 0


def test_garbled_audit_lines_go_to_dead_letter_and_the_stream_goes_on(worker):
    kafka, prefix = worker["kafka"], worker["prefix"]
    producer = KafkaProducer(bootstrap_servers=kafka)
    good = b'type=SYSCALL msg=audit(1795820625.980:900001): arch=c000003e syscall=59 success=yes exit=0 ppid=1 pid=4242 auid=1000 uid=1000 comm="id" exe="/usr/bin/id"\n'
    bad = b"type=SYSCALL msg=audit(17958206\n\xff\xfe garbage \x00\n"
    producer.send(f"{prefix}audit", key=b"vm-bad", value=good + bad + good)
    producer.flush()
    producer.close()
    dead = wait_until(lambda: [d for d in read_json_topic(kafka, f"{prefix}dead-letter")
                               if d["source_topic"] == f"{prefix}audit"], 60,
                      what="audit dead letters", on_fail=worker["svc"].log)
    assert all("vm-bad" in d["reason"] for d in dead)
    assert any(b"garbage" in base64.b64decode(d["original"]) or b"17958206" in base64.b64decode(d["original"])
               for d in dead)
