"""Settings from WARMSTART_* variables: nested names, typed values, errors naming the variable."""

from pathlib import Path

import pytest

from api.errors import InvalidSpecError
from workers.settings import Settings, TemporalSettings


def test_nested_variables_are_typed() -> None:
    settings = Settings.from_env(
        {
            "WARMSTART_HOME": "/srv/ws",
            "WARMSTART_TEMPORAL__ADDRESS": "temporal:7233",
            "WARMSTART_TEMPORAL__UI_PORT": "9000",
            "WARMSTART_TEMPORAL__IDENTITY": "",
            "WARMSTART_NODE__NAME": "gpu-7",
            "WARMSTART_TELEMETRY__EXPORTER": "otlp",
            "WARMSTART_CRIU__LAZY_PAGES": "true",
            "WARMSTART_TELEMETRY__METRICS": "prometheus",
            "WARMSTART_TELEMETRY__PROMETHEUS_PORT": "9100",
            "HOME": "/root",
        }
    )
    assert settings.home == Path("/srv/ws")
    assert settings.checkpoint_root == Path("/srv/ws/checkpoints")
    assert (settings.temporal.port, settings.temporal.ui_port) == (7233, 9000)
    assert settings.temporal.identity is None
    assert settings.node.name == "gpu-7" and settings.node.max_concurrent_activities == 16
    assert settings.telemetry.exporter == "otlp"
    assert settings.criu.lazy_pages is True
    assert (settings.telemetry.metrics, settings.telemetry.prometheus_port) == ("prometheus", 9100)


def test_defaults_without_variables() -> None:
    settings = Settings.from_env({})
    assert settings.temporal == TemporalSettings()
    assert settings.criu.lazy_pages is False  # eager restores unless a node asks
    assert settings.telemetry.metrics == "off"  # no port opened, no interceptor
    assert settings.home.name == "warmstart"
    assert (settings.storage.cache_max_bytes, settings.storage.cache_max_share) == (None, 0.5)
    policy = settings.quarantine.policy(cluster=True)
    assert (policy.min_nodes, policy.expiry_seconds) == (2, 86400.0)
    assert settings.quarantine.policy(cluster=False).min_nodes == 1  # one node in local mode
    three = Settings.from_env({"WARMSTART_QUARANTINE__MIN_NODES": "3"}).quarantine
    assert (three.policy(cluster=True).min_nodes, three.policy(cluster=False).min_nodes) == (3, 3)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WARMSTART_TEMPORAL__UI_PORT": "80x"},
            "WARMSTART_TEMPORAL__UI_PORT='80x': expected an integer",
        ),
        ({"WARMSTART_TELEMETRY__EXPORTER": "jaeger"}, "expected one of off, console, otlp"),
        ({"WARMSTART_TELEMETRY__METRICS": "statsd"}, "expected one of off, prometheus, otlp"),
        (
            {"WARMSTART_CRIU__LAZY_PAGES": "yes"},
            "WARMSTART_CRIU__LAZY_PAGES='yes': expected true or false",
        ),
        ({"WARMSTART_TEMPORAL__ADRESS": "x:1"}, "WARMSTART_TEMPORAL__ADRESS: unknown setting"),
        # The kubelet's service link for the Service warmstart-webhook: refused, saying why.
        (
            {"WARMSTART_WEBHOOK_PORT_443_TCP_PROTO": "tcp"},
            "unless the pod spec sets enableServiceLinks: false",
        ),
        ({"WARMSTART_WEBHOOK_SERVICE_HOST": "10.0.0.7"}, "enableServiceLinks: false"),
        ({"WARMSTART_NODE": "x"}, "WARMSTART_NODE: set its fields with WARMSTART_NODE__<FIELD>"),
        ({"WARMSTART_HOME__X": "x"}, "WARMSTART_HOME: is not a group of settings"),
        (
            {"WARMSTART_STORAGE__CACHE_MAX_SHARE": "1.5"},
            "WARMSTART_STORAGE__CACHE_MAX_SHARE=1.5: expected a share of the disk above 0",
        ),
        (
            {"WARMSTART_QUARANTINE__MIN_NODES": "-1"},
            "WARMSTART_QUARANTINE__MIN_NODES=-1: expected 0 (by mode",
        ),
        (
            {"WARMSTART_QUARANTINE__EXPIRY_SECONDS": "inf"},
            "WARMSTART_QUARANTINE__EXPIRY_SECONDS='inf': expected a positive finite number",
        ),
    ],
)
def test_bad_variables_name_themselves(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message.replace("(", r"\(").replace("*", r"\*")):
        Settings.from_env(env)


def test_other_ports() -> None:
    moved = TemporalSettings(address="127.0.0.1:7233").on_ports(port=7300, ui_port=None)
    assert (moved.address, moved.ui_port) == ("127.0.0.1:7300", 8233)


def test_the_storage_settings_name_one_remote_store_and_the_workers_endpoints() -> None:
    assert not Settings().storage.configured and Settings().storage.location() is None
    storage = Settings.from_env(
        {
            "WARMSTART_STORAGE__S3_BUCKET": "fleet",
            "WARMSTART_STORAGE__S3_PREFIX": "a/b",
            "WARMSTART_STORAGE__S3_ENDPOINT": "http://minio:9000",
            "WARMSTART_STORAGE__SSE": "AES256",
        }
    ).storage
    assert storage.configured
    location = storage.location()
    assert location is not None
    assert (location.kind, location.uri, location.endpoint, location.sse) == (
        "s3",
        "s3://fleet/a/b/",
        "http://minio:9000",
        "AES256",
    )
    assert storage.own_endpoints() == {"s3": ("http://minio:9000", "")}
