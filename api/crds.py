"""CustomResourceDefinitions generated from the resource models (`api.resources`).

Pydantic's JSON Schema is turned into a structural OpenAPI v3 schema as the API server
wants it: references inlined, optional fields as plain properties, `additionalProperties`
only for maps, free-form objects marked `x-kubernetes-preserve-unknown-fields`, exclusive
bounds in the OpenAPI 3.0 form, titles dropped, descriptions kept for `kubectl explain`.
`deploy/crds/` holds the output of `warmstart crds`; a test keeps the two equal.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from api.resources import GROUP, VERSION, Checkpoint, PodSnapshot

_DROPPED = {"title", "$defs"}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` with a `$ref` replaced by its target, sibling keys merged in."""
    if "$ref" not in schema:
        return schema
    target = dict(defs[schema["$ref"].rsplit("/", 1)[1]])
    for key, value in schema.items():
        if key == "$ref":
            continue
        if key == "x-kubernetes-validations":
            target[key] = [*target.get(key, []), *value]
        else:
            target[key] = value
    return _resolve(target, defs)


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One node of a pydantic JSON Schema as a structural OpenAPI v3 schema."""
    schema = _resolve(schema, defs)
    if "anyOf" in schema:  # `X | None`: the API server has no null, an absent field is None
        kinds = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(kinds) != 1:
            raise ValueError(f"a union cannot be a structural schema: {schema['anyOf']}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return structural({**_resolve(kinds[0], defs), **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = structural(value, defs)
            elif value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False (a closed model): structural schemas prune unknown fields anyway
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings are wrapped for the source
        elif key == "default":
            if value is None or isinstance(value, dict | list) or value in ("", 0, False):
                # Object defaults come from the code; zero values are what an absent field
                # means anyway (and clients drop them, which the API server reads as null).
                continue
            out[key] = value
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    return out


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = structural(raw, raw.get("$defs", {}))
    props = schema["properties"]
    props["metadata"] = {"type": "object"}
    for fixed in ("apiVersion", "kind"):
        props[fixed] = {"type": "string"}
    props["status"]["description"] = "What the capture reached; written by warmstart only."
    schema["required"] = ["spec"]
    return schema


_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.identity.model"},
    {"name": "Backend", "type": "string", "jsonPath": ".spec.identity.backendFramework"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "CheckpointID", "type": "string", "jsonPath": ".status.checkpointID"},
    {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # `kubectl get -o wide`: the version pods restore, and a Checkpoint's schedule.
    {"name": "Version", "type": "string", "jsonPath": ".status.version", "priority": 1},
    {"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule.cron", "priority": 1},
]


def crd(model: type[BaseModel], *, plural: str, short_name: str) -> dict[str, Any]:
    kind = model.__name__
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["warmstart"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _COLUMNS,
                    "schema": {"openAPIV3Schema": _schema(model)},
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name in `deploy/crds/` → CRD."""
    return {
        f"checkpoints.{GROUP}.yaml": crd(Checkpoint, plural="checkpoints", short_name="ckpt"),
        f"podsnapshots.{GROUP}.yaml": crd(PodSnapshot, plural="podsnapshots", short_name="podsnap"),
    }


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no anchors or aliases for repeated parts of the schema."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(definition: dict[str, Any]) -> str:
    header = "# Generated by `warmstart crds` from api/resources.py: do not edit.\n"
    return header + yaml.dump(definition, Dumper=_Dumper, sort_keys=False, width=100)
