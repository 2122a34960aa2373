from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np

from features.hashing import MISSING, canonical, hash_token, hash_tokens


def _expected(text: str) -> int:
    raw = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little") & ((1 << 63) - 1)


def test_token_is_masked_blake2b_of_field_equals_value():
    assert hash_token("user_id", 42) == _expected("user_id=42")
    assert hash_tokens("genre", ["Comedy"])[0] == _expected("genre=Comedy")


def test_missing_values_are_zero_and_everything_else_positive():
    t = hash_tokens("f", [None, "", float("nan"), 0, "0", "x"])
    assert t[:3].tolist() == [MISSING] * 3
    assert (t[3:] > 0).all()
    assert t.dtype == np.int64


def test_vectorised_equals_scalar_for_every_input_kind():
    ints = np.array([5, 3, 5, 900, 3], dtype=np.int64)
    objs = [5, "3", 5.0, "900", np.int32(3)]
    floats = np.array([5.0, 3.0, 5.0, 900.0, 3.0])
    expected = [hash_token("item_id", v) for v in ints]
    for values in (ints, objs, floats, ints.astype(str)):
        assert hash_tokens("item_id", values).tolist() == expected


def test_fields_separate_equal_values():
    assert hash_token("user_id", 7) != hash_token("item_id", 7)


def test_canonical_forms():
    assert [canonical(v) for v in (1, 1.0, "1", b"1", True, None, 2.5)] == [
        "1",
        "1",
        "1",
        "1",
        "true",
        "",
        "2.5",
    ]


def test_empty_input():
    assert hash_tokens("f", []).shape == (0,)


def test_stable_across_processes():
    code = (
        "from features.hashing import hash_tokens; print(hash_tokens('user_id', ['a', 7]).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        cwd=str(__import__("pathlib").Path(__file__).parents[2]),
    )
    assert out.stdout.strip() == str(hash_tokens("user_id", ["a", 7]).tolist())
