"""Small network helpers shared by the stack and the services."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when ``host:port`` accepts a TCP connection within ``timeout`` seconds.

    >>> port_open("127.0.0.1", 1)
    False
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redact_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***``: safe to print, log and serve.

    >>> redact_url("redis://:s3cret@redis:6379/0")
    'redis://:***@redis:6379/0'
    >>> redact_url("rediss://app:s3cret@10.0.0.5:6380")
    'rediss://app:***@10.0.0.5:6380'
    >>> redact_url("redis://127.0.0.1:16379")
    'redis://127.0.0.1:16379'
    """
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
