"""``headwater ship-audit``: tail an auditd log into the ``audit`` topic, keyed by host.

Like auditbeat, it ships batches of lines (one Kafka message per batch), survives log
rotation and resumes where it stopped: the position is committed only after the
producer has flushed the batch, so a crash re-ships at most one batch (the detection
engine coalesces by serial, which absorbs the repeat).
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.settings import Settings
from detection.tail import AuditTailer
from streams.producer import make_producer

log = logging.getLogger(__name__)


def ship_audit(settings: Settings, bootstrap: str, path: Path, host: str, state_path: Path,
               follow: bool = False, max_lines: int = 1000) -> int:
    """Ship ``path`` (and, with ``follow``, what is appended later); returns lines shipped."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    topic = settings.topics["audit"]
    producer = make_producer(bootstrap)
    tailer = AuditTailer(path, state_path)
    shipped = 0
    key = host.encode()
    try:
        for batch in tailer.batches(follow=follow, max_lines=max_lines):
            if not batch:
                continue
            value = "".join(ln if ln.endswith("\n") else ln + "\n" for ln in batch)
            producer.send(topic, key=key, value=value.encode("utf-8", "surrogateescape"))
            producer.flush()
            tailer.commit()
            shipped += len(batch)
    except KeyboardInterrupt:
        log.info("ship-audit stopped after %d lines", shipped)
    finally:
        producer.close()
    return shipped
