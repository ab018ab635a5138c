"""The one way this code logs in to the API server."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kubernetes import client, config


class Login(Protocol):
    """Where the API server is and how to prove who we are (`workers.settings.KubeSettings`)."""

    @property
    def server(self) -> str: ...
    @property
    def token_file(self) -> str: ...
    @property
    def insecure_skip_tls_verify(self) -> bool: ...


def api_client(login: Login) -> client.ApiClient:
    """The API server of `login.server`, else the pod's service account, else the
    kubeconfig."""
    if login.server:
        configuration = client.Configuration()
        configuration.host = login.server
        configuration.verify_ssl = not login.insecure_skip_tls_verify
        if login.token_file:
            token = Path(login.token_file).read_text().strip()
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
