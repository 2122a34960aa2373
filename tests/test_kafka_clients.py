"""Every Kafka client of the product is built by core/kafka.py, with the security settings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core import kafka as kafka_clients
from core.settings import Settings
from streams.app import faust_credentials

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "headwater", "streams", "features", "learner", "detection", "serving")
CLIENT_CLASSES = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "AIOKafkaProducer",
                  "AIOKafkaConsumer", "Producer", "Consumer"}


def _built_clients(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in CLIENT_CLASSES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    return found


def test_no_kafka_client_is_built_outside_the_factory():
    built = [hit for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             if path != REPO / "core" / "kafka.py" for hit in _built_clients(path)]
    assert built == []
    assert _built_clients(REPO / "core" / "kafka.py")  # the scan does see a client when there is one


@pytest.fixture
def sasl_env(monkeypatch):
    monkeypatch.setenv("HEADWATER_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("HEADWATER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("HEADWATER_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("HEADWATER_KAFKA_SASL_PASSWORD", "s3cret")


def test_the_security_settings_reach_kafka_python_clients(sasl_env):
    # api_version given: the clients are built without contacting the (absent) broker
    consumer = kafka_clients.consumer("127.0.0.1:1", api_version=(2, 5))
    producer = kafka_clients.producer("127.0.0.1:1", api_version=(2, 5))
    try:
        for client in (consumer, producer):
            assert client.config["security_protocol"] == "SASL_SSL"
            assert client.config["sasl_mechanism"] == "SCRAM-SHA-512"
            assert client.config["sasl_plain_username"] == "svc"
    finally:
        consumer.close()
        producer.close(timeout=1)


def test_and_the_librdkafka_producer(sasl_env):
    config = kafka_clients.librdkafka_config()
    assert config["security.protocol"] == "sasl_ssl" and config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "svc" and config["sasl.password"] == "s3cret"
    # librdkafka checks its properties when the client is built: a bad one raises here
    kafka_clients.native_producer("127.0.0.1:1", **{"socket.timeout.ms": 10_000})
    with pytest.raises(Exception, match="Unsupported SASL mechanism"):
        kafka_clients.native_producer("127.0.0.1:1", **{"sasl.mechanism": "NOT-A-MECHANISM"})


def test_and_faust(sasl_env):
    creds = faust_credentials(Settings())
    assert type(creds).__name__ == "SASLCredentials"
    assert creds.username == "svc" and creds.ssl_context is not None


def test_the_password_is_never_printed(sasl_env, capsys):
    from headwater.cli import main

    assert main(["settings"]) == 0
    assert "s3cret" not in capsys.readouterr().out
    assert "s3cret" not in repr(Settings())


@pytest.mark.parametrize(("env", "message"), [
    ({"HEADWATER_KAFKA_SECURITY_PROTOCOL": "TLS"}, "is not one of"),
    ({"HEADWATER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "needs HEADWATER_KAFKA_SASL_USERNAME"),
    ({"HEADWATER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "HEADWATER_KAFKA_SASL_USERNAME": "u",
      "HEADWATER_KAFKA_SASL_PASSWORD": "p", "HEADWATER_KAFKA_SASL_MECHANISM": "GSSAPI"}, "is not one of"),
])
def test_bad_security_settings_name_what_is_wrong(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        kafka_clients.client_config()
