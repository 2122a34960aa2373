"""The one place Kafka clients are built: kafka-python producers, consumers and admins,
and the librdkafka producer of serving's impression log.

Every client of the product goes through :func:`producer`, :func:`consumer`,
:func:`admin` or :func:`native_producer` (a test fails on a client built anywhere else),
so the security settings
(``HEADWATER_KAFKA_SECURITY_PROTOCOL``, ``_SASL_*``, ``_SSL_*``) reach all of them; the
Faust worker gets the same settings through :func:`security`. The settings are read from
the environment when a client is built (``headwater --set`` exports its overrides), so a
service never needs them threaded through its constructors.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from core.settings import Settings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: the largest record the product's producers send (kafka-python's and librdkafka's
#: defaults, 1 MB, are within reach of an impression answering many candidates)
MAX_MESSAGE_BYTES = 8 << 20


@dataclass(frozen=True)
class Security:
    """How to reach the brokers: protocol, SASL credentials, TLS files."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")


def security(settings: Settings | None = None) -> Security:
    """The security settings, checked: a bad combination names what is missing.

    >>> security(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="svc"))
    Traceback (most recent call last):
    ...
    ValueError: HEADWATER_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs HEADWATER_KAFKA_SASL_PASSWORD
    >>> security(Settings()).protocol
    'PLAINTEXT'
    """
    if settings is None:
        return _from_environment(_security_environment())
    s = settings
    protocol = s.kafka_security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"HEADWATER_KAFKA_SECURITY_PROTOCOL={protocol} is not one of {', '.join(PROTOCOLS)}")
    password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None
    sec = Security(protocol, s.kafka_sasl_mechanism.upper() if protocol.startswith("SASL_") else None,
                   s.kafka_sasl_username, password, s.kafka_ssl_cafile, s.kafka_ssl_certfile,
                   s.kafka_ssl_keyfile)
    if sec.sasl:
        if sec.mechanism not in MECHANISMS:
            raise ValueError(f"HEADWATER_KAFKA_SASL_MECHANISM={sec.mechanism} is not one of "
                             f"{', '.join(MECHANISMS)}")
        for name, value in (("USERNAME", sec.username), ("PASSWORD", sec.password)):
            if not value:
                raise ValueError(f"HEADWATER_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                                 f"HEADWATER_KAFKA_SASL_{name}")
    return sec


def _security_environment() -> tuple[tuple[str, str], ...]:
    """The environment variables the security settings come from (names as given)."""
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k.upper().startswith("HEADWATER_KAFKA_")))


@functools.lru_cache(maxsize=8)
def _from_environment(environment: tuple[tuple[str, str], ...]) -> Security:
    """:func:`security` of the environment, built once per distinct value of its
    variables (every client asks; ``Settings()`` reads and checks all of them)."""
    return security(Settings())


def client_config(settings: Settings | None = None) -> dict[str, Any]:
    """kafka-python keyword arguments for the security settings.

    >>> sorted(client_config(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="svc",
    ...     kafka_sasl_password="pw", kafka_ssl_cafile="/etc/ca.pem")).items())  # doctest: +NORMALIZE_WHITESPACE
    [('sasl_mechanism', 'PLAIN'), ('sasl_plain_password', 'pw'), ('sasl_plain_username', 'svc'),
     ('security_protocol', 'SASL_SSL'), ('ssl_cafile', '/etc/ca.pem')]
    >>> client_config(Settings())
    {'security_protocol': 'PLAINTEXT'}
    """
    sec = security(settings)
    config: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.sasl:
        config.update(sasl_mechanism=sec.mechanism, sasl_plain_username=sec.username,
                      sasl_plain_password=sec.password)
    if sec.tls:
        for key, value in (("ssl_cafile", sec.cafile), ("ssl_certfile", sec.certfile),
                           ("ssl_keyfile", sec.keyfile)):
            if value:
                config[key] = value
    return config


def librdkafka_config(settings: Settings | None = None) -> dict[str, str]:
    """librdkafka (``confluent_kafka``) properties for the security settings.

    >>> sorted(librdkafka_config(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="svc",
    ...     kafka_sasl_password="pw", kafka_ssl_cafile="/etc/ca.pem")).items())  # doctest: +NORMALIZE_WHITESPACE
    [('sasl.mechanism', 'PLAIN'), ('sasl.password', 'pw'), ('sasl.username', 'svc'),
     ('security.protocol', 'sasl_ssl'), ('ssl.ca.location', '/etc/ca.pem')]
    >>> librdkafka_config(Settings())
    {'security.protocol': 'plaintext'}
    """
    sec = security(settings)
    config = {"security.protocol": sec.protocol.lower()}
    if sec.sasl:
        config.update({"sasl.mechanism": sec.mechanism, "sasl.username": sec.username,
                       "sasl.password": sec.password})
    if sec.tls:
        for key, value in (("ssl.ca.location", sec.cafile), ("ssl.certificate.location", sec.certfile),
                           ("ssl.key.location", sec.keyfile)):
            if value:
                config[key] = value
    return config


def _servers(bootstrap: str | list[str]) -> list[str]:
    return bootstrap if isinstance(bootstrap, list) else [b.strip() for b in bootstrap.split(",") if b.strip()]


def producer(bootstrap: str | list[str], **options: Any):
    """A ``kafka.KafkaProducer`` with the security settings; ``options`` as kafka-python's."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=_servers(bootstrap), **{**client_config(), **options})


def consumer(bootstrap: str | list[str], *topics: str, **options: Any):
    """A ``kafka.KafkaConsumer`` with the security settings; ``options`` as kafka-python's."""
    from kafka import KafkaConsumer

    return KafkaConsumer(*topics, bootstrap_servers=_servers(bootstrap), **{**client_config(), **options})


def admin(bootstrap: str | list[str], admin_class: type | None = None, **options: Any):
    """A ``kafka.KafkaAdminClient`` (or ``admin_class``, a subclass) with the security settings."""
    from kafka import KafkaAdminClient

    cls = admin_class or KafkaAdminClient
    return cls(bootstrap_servers=_servers(bootstrap), **{**client_config(), **options})


def native_producer(bootstrap: str | list[str], **properties: Any):
    """A ``confluent_kafka.Producer`` (librdkafka) with the security settings;
    ``properties`` are librdkafka's (``linger.ms``, ...). Its batching, compression and
    network I/O run in librdkafka's own threads, off the interpreter lock: serving's
    impression log uses it so that logging an answer does not take the GIL from requests
    (docs/decisions.md, "Impressions through librdkafka")."""
    from confluent_kafka import Producer

    config = {"bootstrap.servers": ",".join(_servers(bootstrap)), "client.id": "headwater",
              **librdkafka_config(), **properties}
    return Producer(config)
