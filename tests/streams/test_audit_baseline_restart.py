"""The learned per-host baseline lives in Redis and survives a worker restart (issue 16)."""

from __future__ import annotations

import re
import time

import pytest
import redis

from core.settings import Settings
from detection.baseline_store import baseline_key
from detection.engine import DetectionEngine
from streams.audit_shipper import ship_audit
from tests.stackutil import Service, service_env, wait_until

from .conftest import instance_of

pytestmark = pytest.mark.integration


def _observed(client, host) -> float:
    raw = client.hget(baseline_key(host), "_observed")
    return float(raw.split(b",")[0]) if raw else 0.0


def _settled(client, host, floor: float):
    """The stored ``_observed`` once it has passed *floor* and stopped moving."""
    first = _observed(client, host)
    if first <= floor:
        return None
    time.sleep(1.0)
    return first if _observed(client, host) == first else None


def _learned_alone(host: str, log) -> float:
    """How much a fresh engine learns from *log* on its own (decayed edges observed)."""
    eng = DetectionEngine(host=host)
    eng.process_lines(log.read_text(encoding="utf-8").splitlines())
    eng.flush()
    return eng.model.observed


def _start_worker(env, tmp_path, client) -> Service:
    svc = Service("worker", env, tmp_path / "logs")
    wait_until(lambda: client.get(f"hw:status:worker:{instance_of(svc)}"), 90,
               what="worker heartbeat", on_fail=svc.log)
    return svc


def test_baseline_is_saved_with_a_ttl_and_restored_after_restart(kafka_bootstrap, redis_url,
                                                                 data_dir, tmp_path):
    prefix = f"b{int(time.time() * 1000) % 10**8}-"
    host = f"vm-learn-{prefix[:-1]}"
    env = service_env(kafka_bootstrap, redis_url, prefix, tmp_path,
                      HEADWATER_CONTENT_ENCODER="hashing")
    client = redis.Redis.from_url(redis_url)
    settings = Settings(topic_prefix=prefix)
    benign = data_dir / "audit" / "dev01_benign_admin_dev.log"
    attack = data_dir / "audit" / "dev04_credential_exfil.log"
    svc = _start_worker(env, tmp_path, client)
    try:
        ship_audit(settings, kafka_bootstrap, benign, host, tmp_path / "pos1", follow=False)
        benign_alone = _learned_alone(host, benign)
        wait_until(lambda: _settled(client, host, 0.9 * benign_alone), 90,
                   what="the benign log learned into Redis", on_fail=svc.log)
        svc.stop()
        first = _observed(client, host)  # nothing writes any more
        ttl = client.ttl(baseline_key(host))
        assert 0 < ttl <= settings.audit_baseline_ttl
        stored_patterns = client.hlen(baseline_key(host)) - 1  # minus _observed
        assert stored_patterns > 100

        svc = _start_worker(env, tmp_path, client)
        ship_audit(settings, kafka_bootstrap, attack, host, tmp_path / "pos2", follow=False)
        alone_observed = _learned_alone(host, attack)
        final = wait_until(lambda: _settled(client, host, first + 0.5 * alone_observed), 90,
                           what="the attack log learned on top of the restored baseline",
                           on_fail=lambda: f"{_observed(client, host)} {svc.log()}")
        assert final > alone_observed + 0.5 * first
        restored = [int(n) for n in re.findall(
            rf"audit host {re.escape(host)}: restored (\d+) learned baseline patterns", svc.log())]
        assert restored == [stored_patterns], svc.log()[-3000:]
    finally:
        svc.stop()
        client.delete(baseline_key(host))
        client.close()
