"""Headwater: streaming real-time learning and detection on Kafka, Redis and torch.

The Python client is importable from here (loaded on first use, so the CLI starts fast)::

    from headwater import EventSender, ServingClient, FeatureReader

See :mod:`headwater.client`; the command line is :mod:`headwater.cli`.
"""

from __future__ import annotations

from typing import Any

_CLIENT = ("DeliveryError", "EventSender", "FeatureReader", "HeadwaterError", "InvalidEvent",
           "Scores", "ServingClient")
__all__ = [*_CLIENT, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _CLIENT:
        from headwater import client

        return getattr(client, name)
    if name == "__version__":
        from importlib.metadata import version

        return version("headwater")
    raise AttributeError(f"module 'headwater' has no attribute {name!r}")
