"""Static checks of what cannot run here (no container engine): compose file and Dockerfile."""

from pathlib import Path

import yaml

from workers.devserver import DYNAMIC_CONFIG
from workflows.visibility import ALL_KEYS

REPO = Path(__file__).resolve().parents[1]


def test_compose_registers_every_search_attribute_and_builds_our_image() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"temporal", "minio", "warmstart"} <= set(services)
    flags = " ".join(services["temporal"]["command"])
    for key in ALL_KEYS:
        assert f"--search-attribute={key.name}=Keyword" in flags
    for value in DYNAMIC_CONFIG:  # eager start and dispatch, as `warmstart dev` runs it
        assert f"--dynamic-config-value={value}" in flags
    for service in services.values():  # nothing unauthenticated on other interfaces
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
    build = services["warmstart"]["build"]
    assert (REPO / build["dockerfile"]).is_file()
    assert services["warmstart"]["privileged"] is True


def test_dockerfile_copies_every_package() -> None:
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    for package in ("api", "workflows", "activities", "workers"):
        assert f"COPY {package} {package}" in text
    assert "install-criu.sh" in text
