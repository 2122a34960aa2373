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
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["MISSING", "canonical", "factorize", "hash_token", "hash_tokens"]

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


# Types whose raw values can be deduplicated before canonicalising: within one of these
# sets, equal Python values have equal canonical text and vice versa (1, 1.0 and True
# hash alike in a dict, so mixes of int, float and bool take the slow path).
_RAW_SAFE = ({str, type(None)}, {int, type(None)})


def factorize(values: Iterable[Any] | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes into distinct canonical texts: ``texts[codes[i]] == canonical(values[i])``.

    ``canonical`` runs once per distinct value, not once per value, so a column of 20,000
    ids from 300 users costs 300 conversions plus one dict pass.

    >>> codes, texts = factorize([242, None, 242.0, "7", 242])
    >>> codes.tolist(), texts
    ([0, 1, 0, 2, 0], ['242', '', '7'])
    """
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"factorize: values must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), []
    if arr.dtype.kind in "iufUS":
        uniq, inverse = np.unique(arr, return_inverse=True)
        texts = [canonical(u.item() if hasattr(u, "item") else u) for u in uniq]
    else:
        items = arr.tolist()
        kinds = set(map(type, items))
        index: dict[Any, int] = {}
        if any(kinds <= safe for safe in _RAW_SAFE):
            inverse = np.fromiter(
                (index.setdefault(v, len(index)) for v in items), np.int64, len(items)
            )
            texts = [canonical(u) for u in index]
        else:
            inverse = np.fromiter(
                (index.setdefault(canonical(v), len(index)) for v in items), np.int64, len(items)
            )
            texts = list(index)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    # Distinct raw values can share a text (242 and 242.0, or b"x" and "x"): merge them.
    merged: dict[str, int] = {}
    remap = np.fromiter((merged.setdefault(t, len(merged)) for t in texts), np.int64, len(texts))
    if len(merged) == len(texts):
        return inverse, texts
    return remap[inverse], list(merged)


def digests(field: str, texts: Sequence[str]) -> np.ndarray:
    """Tokens of distinct canonical texts of one field (``''`` → 0)."""
    return np.fromiter(
        (MISSING if t == "" else _digest(field, t) for t in texts), dtype=np.int64, count=len(texts)
    )


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
    codes, texts = factorize(values)
    if not texts:
        return np.zeros(0, dtype=np.int64)
    return digests(field, texts)[codes]
