"""Restore targets are scheduled only on nodes that run a node worker: the webhook's shaping
requires the node worker's labels, keeping the pod's own alternatives (each ANDed)."""

from __future__ import annotations

from typing import Any

import pytest

from api.errors import InvalidSpecError
from api.restore_pods import require_node_labels
from workers.settings import Settings

GPU = (("nvidia.com/gpu.present", "true"),)
OURS = {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}


def required(spec: dict[str, Any]) -> list[dict[str, Any]]:
    affinity = spec["affinity"]["nodeAffinity"]
    terms: list[dict[str, Any]] = affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return terms


def test_a_pod_without_affinity_gets_one_term_of_the_node_labels() -> None:
    spec: dict[str, Any] = {"containers": [{"name": "main"}]}
    require_node_labels(spec, GPU)
    assert required(spec) == [{"matchExpressions": [OURS]}]


def test_each_of_the_pods_own_alternatives_also_needs_the_node_labels() -> None:
    zone_a = {"key": "zone", "operator": "In", "values": ["a"]}
    pool = {"key": "pool", "operator": "Exists"}
    spec: dict[str, Any] = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [zone_a]},
                        {"matchExpressions": [pool], "matchFields": []},
                    ]
                },
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1}],
            },
            "podAntiAffinity": {"x": 1},
        }
    }
    require_node_labels(spec, GPU)
    assert required(spec) == [
        {"matchExpressions": [zone_a, OURS]},
        {"matchExpressions": [pool, OURS], "matchFields": []},
    ]
    assert spec["affinity"]["podAntiAffinity"] == {"x": 1}  # the rest untouched
    assert spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_no_labels_no_constraint() -> None:
    spec: dict[str, Any] = {}
    require_node_labels(spec, ())
    assert spec == {}


def test_the_webhook_setting_names_the_labels_or_its_error() -> None:
    hook = Settings.from_env({"WARMSTART_WEBHOOK__NODE_LABELS": "a=1, b=two"}).webhook
    assert hook.node_label_pairs() == (("a", "1"), ("b", "two"))
    assert Settings().webhook.node_label_pairs() == GPU
    bad = Settings.from_env({"WARMSTART_WEBHOOK__NODE_LABELS": "a=1,oops"}).webhook
    with pytest.raises(InvalidSpecError, match="'oops' is not key=value"):
        bad.node_label_pairs()
