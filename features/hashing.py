"""Categorical values to stable int64 tokens (contract: docs/contracts.md, "Categorical tokens").

A token is the blake2b-64 digest of the UTF-8 string ``f"{field}={value}"`` masked to
63 bits, so it is non-negative, identical in every process and on every machine (no
Python ``hash()``, which is salted per process), and distinct across fields for equal
values (``user_id=7`` and ``item_id=7`` never collide by construction).

Token ``0`` is reserved for *missing*: ``None``, ``''`` and float NaN map to it, and a
real value whose digest happens to be 0 is moved to 1 so the two can never be confused.

Work is vectorised over distinct values: a batch of 1,000 clicks from 300 users hashes
300 strings, not 1,000.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["MISSING", "hash_token", "hash_tokens", "canonical"]

MISSING = 0
_MASK63 = (1 << 63) - 1


def canonical(value: Any) -> str:
    """The text a value is hashed as; ``''`` means missing.

    Integers (Python or numpy) print without a decimal point; an integral float is
    printed as an integer too, because ids read from JSON or a float column
    (``242.0``) must give the same token as ``242``.

    >>> canonical(242), canonical(242.0), canonical("242"), canonical(None)
    ('242', '242', '242', '')
    >>> canonical(float("nan")), canonical(2.5), canonical(True)
    ('', '2.5', 'true')
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if value != value:  # NaN
            return ""
        if float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def hash_token(field: str, value: Any) -> int:
    """Token of one value; see :func:`hash_tokens` for the vectorised form.

    >>> hash_token("user_id", None)
    0
    >>> hash_token("user_id", 42) == hash_token("user_id", "42") != hash_token("item_id", 42)
    True
    """
    text = canonical(value)
    if text == "":
        return MISSING
    return _digest(field, text)


def _digest(field: str, text: str) -> int:
    raw = hashlib.blake2b(f"{field}={text}".encode(), digest_size=8).digest()
    token = int.from_bytes(raw, "little") & _MASK63
    return token or 1  # 0 is reserved for missing


def hash_tokens(field: str, values: Iterable[Any] | np.ndarray) -> np.ndarray:
    """Hash a column of values of one field to int64 tokens (``0`` = missing).

    Parameters
    ----------
    field : str
        Field name; part of the hashed string, so equal values of different fields
        get different tokens.
    values : array-like
        Any 1-D sequence: ints, floats, strings, bytes or ``None``.

    Returns
    -------
    numpy.ndarray
        ``int64`` tokens, one per value, all ``>= 0``.

    Examples
    --------
    >>> t = hash_tokens("item_id", [242, "242", None, "", 7])
    >>> t.dtype, bool(t[0] == t[1]), t[2:4].tolist(), bool(t[4] > 0)
    (dtype('int64'), True, [0, 0], True)
    """
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"hash_tokens({field!r}): values must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind in "iu":
        uniq, inverse = np.unique(arr, return_inverse=True)
        texts = [str(int(u)) for u in uniq]
    else:
        if arr.dtype.kind == "f":
            # NaN != NaN, so np.unique keeps each NaN apart; that is fine: all map to 0.
            uniq, inverse = np.unique(arr, return_inverse=True)
        else:
            # Objects (mixed ints/strings/None) cannot be sorted; dedupe through a dict.
            index: dict[str, int] = {}
            inverse = np.fromiter(
                (index.setdefault(canonical(v), len(index)) for v in arr),
                dtype=np.int64,
                count=arr.size,
            )
            uniq = np.asarray(list(index), dtype=object)
        texts = [canonical(u) for u in uniq]
    table = np.fromiter(
        (MISSING if t == "" else _digest(field, t) for t in texts),
        dtype=np.int64,
        count=len(texts),
    )
    return table[inverse.reshape(-1)]
