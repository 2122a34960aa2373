"""Small network helpers shared by the stack and the services."""

from __future__ import annotations

import socket


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
