"""Numeric loops compiled by numba on first use (docs/decisions.md, "The point-in-time
replay as a compiled loop").

:func:`compiled` wraps a plain Python function of numbers and arrays; its first call
imports numba and compiles the function (or loads it from numba's cache beside its
module, ``__pycache__``), later calls go straight to the machine code. Processes that
never call one (serving, the CLI) never import numba.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["compiled"]

log = logging.getLogger(__name__)


class compiled:  # noqa: N801 - used like a decorator
    """``fn`` compiled by numba (``njit``, ``cache=True``, ``nogil=True``) on first call.

    ``py`` is the plain function (the same semantics, for reading and for tests).
    Callers pass C-contiguous arrays of fixed dtypes, so one specialisation is compiled.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.py = fn
        self._fast: Callable[..., Any] | None = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, *args: Any) -> Any:
        if self._fast is None:
            self._fast = self._compile()
        return self._fast(*args)

    def _compile(self) -> Callable[..., Any]:
        import numba

        try:
            return numba.njit(cache=True, nogil=True)(self.py)
        except RuntimeError as exc:  # nowhere writable to cache (read-only tree and home)
            log.warning("%s: compiled without a disk cache (%s); set NUMBA_CACHE_DIR to a "
                        "writable directory to keep it between starts", self.__name__, exc)
            return numba.njit(cache=False, nogil=True)(self.py)
