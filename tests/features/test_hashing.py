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


def test_read_only_columns_are_factorised_once_and_alike():
    from features.hashing import factorize

    values = ["u7", None, "u2", "u7", "", "u2"]
    ids = np.array(values, dtype=object)
    ids.flags.writeable = False
    codes, texts = factorize(ids)
    again, texts2 = factorize(ids)
    assert again is codes and not codes.flags.writeable  # the memo, read-only
    texts2.append("x")  # callers get their own list
    plain = factorize(list(values))
    assert codes.tolist() == plain[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert texts == plain[1] == ["u7", "", "u2"]
    writable = np.array(values, dtype=object)
    assert factorize(writable)[0] is not factorize(writable)[0]  # a writable array: never memoised
    view = ids[:4]  # a view: its base could change, so not memoised either
    assert factorize(view)[0] is not factorize(view)[0]


def test_a_new_array_at_a_reused_address_is_not_taken_for_the_old_one():
    from features.hashing import factorize

    for k in range(50):
        ids = np.array([f"a{k}", f"b{k}", f"a{k}"], dtype=object)
        ids.flags.writeable = False
        assert factorize(ids)[1] == [f"a{k}", f"b{k}"]
        del ids  # the next array may get the same id()
