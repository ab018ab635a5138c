"""The kustomizations of deploy/ as users apply them (`kubectl apply -k`): rendered by a real
kustomize where one is installed (`kubectl kustomize`, else the `kustomize` binary), and
read without one (the files they list, bases first, patches not applied)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "kubernetes"  # kubectl apply -k deploy/kubernetes
OVERLAYS = INSTALL / "overlays"
# What kubectl 1.20's built-in kustomize (v2.0.3) reads of a kustomization.
V2_FIELDS = {
    "resources",
    "bases",
    "patchesStrategicMerge",
    "patchesJson6902",
    "images",
    "namespace",
    "configMapGenerator",
}


def kustomizations() -> list[Path]:
    """Every directory of deploy/ holding a kustomization."""
    return sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def kustomization(directory: Path) -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return found


def _command() -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run(
            [kubectl, "kustomize", "--help"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [kubectl, "kustomize"]
    binary = shutil.which("kustomize")
    return [binary, "build"] if binary else None


RENDER = _command()
RENDER_SKIP = (
    None if RENDER else "no kustomize here: neither `kubectl kustomize` nor a `kustomize` binary"
)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` applies (a real kustomize must be there)."""
    assert RENDER is not None, RENDER_SKIP
    done = subprocess.run(
        [*RENDER, str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{directory}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def listed(directory: Path) -> list[dict[str, Any]]:
    """The objects `directory`'s kustomization lists, its bases' first, unpatched."""
    spec = kustomization(directory)
    docs: list[dict[str, Any]] = []
    for base in spec.get("bases") or []:
        docs += listed((directory / base).resolve())
    for name in spec.get("resources") or []:
        text = (directory / name).read_text()
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def install_docs(directory: Path = INSTALL) -> list[dict[str, Any]]:
    """What installing `directory` applies: rendered where a kustomize is installed, else
    the files it lists (right for a kustomization without patches)."""
    return render(directory) if RENDER else listed(directory)


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return doc["kind"], meta["name"], meta.get("namespace", "")


WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")


def webhook_configurations() -> list[dict[str, Any]]:
    """The webhook configurations the default install applies."""
    return [doc for doc in install_docs() if doc["kind"] in WEBHOOK_KINDS]
