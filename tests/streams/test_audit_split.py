"""How an audit message is cut into lines: the same as the reference definition."""

from __future__ import annotations

import json
import random

from streams.audit_path import message_host, split_audit_message


def _reference(key, value):
    """The definition as first written: strip a copy of the message, strip every line."""
    host = key.decode("utf-8", "replace") if key else "unknown"
    text = value.lstrip()
    if text.startswith(b"{") and b'"lines"' in text[:4096]:
        try:
            doc = json.loads(text)
            host = str(doc.get("host") or host)
            return host, [ln.encode() if isinstance(ln, str) else ln for ln in doc["lines"]]
        except (ValueError, KeyError, TypeError):
            pass
    return host, [ln for ln in value.splitlines() if ln.strip()]


CASES = [
    b"", b"\n", b" \n\t\n", b"type=EOE msg=audit(1.0:2): \n", b"a\r\nb\rc\n\x0b\x0c\n \n",
    b"a\n\x1c\n\x85\nb", b"  \n{not json", b'{"host": "db1", "lines": ["x", "y"]}',
    b'  \n {"host": "", "lines": ["x"]}', b'{"lines": 3}', b'{"lines": [1]}', b"{}\nx",
    b'\t{"host": "h", "lines": []}', b'{"host": "h", "lines": ["a"]} trailing',
    b"\xff\xfe\n \xa0\nz", b"\x0btype=X\n",
]


def test_split_is_the_reference_on_edge_cases_and_mutants():
    rng = random.Random(16)
    alphabet = b" \t\r\n\x0b\x0c\x1c{}\"xy:=,[]"
    values = list(CASES)
    for _ in range(5_000):
        base = bytearray(rng.choice(CASES))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randint(0, len(base))
            base[pos:pos] = bytes([rng.choice(alphabet)])
        values.append(bytes(base))
    for value in values:
        for key in (b"vm", None):
            assert split_audit_message(key, value) == _reference(key, value), value
            assert message_host(key, value) == _reference(key, value)[0], value
