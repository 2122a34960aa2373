"""features.jit: a plain function compiled on first call, with or without a disk cache."""

from __future__ import annotations

import numpy as np

from features import jit


def _total(a):
    s = 0.0
    for v in a:
        s += v
    return s


def test_compiled_runs_the_plain_functions_semantics():
    fast = jit.compiled(_total)
    assert fast.py is _total and fast.__name__ == "_total"
    a = np.arange(10.0)
    assert fast(a) == _total(a) == 45.0


def test_without_anywhere_to_cache_it_compiles_without_a_cache(monkeypatch, caplog):
    import numba

    real = numba.njit
    calls = []

    def njit(**kw):
        calls.append(kw["cache"])
        if kw["cache"]:
            raise RuntimeError("cannot cache function '_total': no locator available for file 'x'")
        return real(**kw)

    monkeypatch.setattr(numba, "njit", njit)
    fast = jit.compiled(_total)
    assert fast(np.arange(4.0)) == 6.0
    assert calls == [True, False]
    assert "compiled without a disk cache" in caplog.text
