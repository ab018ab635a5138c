"""The dashboard and alert rules in deploy/observability/ name only metrics the code exports:
the exported names come from the instruments `activities.metrics` makes, through the
Prometheus exporter itself, never from a copy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from activities import metrics

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "warmstart-dashboard.json"
ALERTS = OBSERVABILITY / "warmstart-alerts.yaml"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
KEYWORDS |= {"unless", "offset", "inf", "nan"}


def exported() -> tuple[set[str], set[str]]:
    """(series names, label names) a Prometheus scrape shows once every instrument of
    `activities.metrics` recorded a value with every attribute key the code uses."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    keys = {
        value
        for name, value in vars(metrics).items()
        if name.isupper() and isinstance(value, str) and "." in value and name != "METER"
    }
    attributes = {key: "x" for key in keys}

    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1, attributes)]

    gauges = {spec.name: observe for spec in metrics.INSTRUMENTS if spec.kind == "gauge"}
    made = metrics.make_instruments(provider.get_meter(metrics.METER), gauges)
    for spec in metrics.INSTRUMENTS:
        if spec.kind in ("counter", "updown"):
            made[spec.name].add(1, attributes)
        elif spec.kind == "histogram":
            made[spec.name].record(1.0, attributes)
    names, labels = set(), set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
            labels |= set(sample.labels)
    provider.shutdown()
    return names, labels


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label lists (`by (...)`), matchers (`{...}`), ranges or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    found = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        found.add(name)
    return found


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or aggregates by."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        found |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for listed in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
        found |= {name.strip() for name in listed.split(",") if name.strip()}
    return found


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


# Labels Prometheus adds to every scraped series, and the histogram's bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}


def test_the_parser_finds_names_and_skips_the_rest() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, a_b) (rate(x_bucket{c="d{e}", f!~"g"}[5m])))'
        " / on(job) group_left(h) y_total offset 5m > bool 2"
    )
    assert metric_names(expr) == {"x_bucket", "y_total"}
    assert label_names(expr) == {"le", "a_b", "c", "f"}


@pytest.mark.parametrize(
    ("where", "exprs"), [("dashboard", dashboard_exprs()), ("alerts", alert_exprs())]
)
def test_every_query_names_metrics_and_labels_the_code_exports(
    where: str, exprs: list[str]
) -> None:
    names, labels = exported()
    assert "warmstart_restore_duration_seconds_bucket" in names  # the exporter's naming
    assert exprs, where
    for expr in exprs:
        selected = metric_names(expr)
        assert selected, f"{where}: {expr!r} names no metric"
        assert selected <= names, f"{where}: {sorted(selected - names)} not exported"
        unknown = label_names(expr) - labels - SCRAPE_LABELS
        assert not unknown, f"{where}: labels {sorted(unknown)} not exported: {expr!r}"


def test_every_instrument_is_on_the_dashboard() -> None:
    """A metric the code exports and nobody looks at is a metric nobody will miss."""
    shown = set().union(*map(metric_names, dashboard_exprs()))
    for spec in metrics.INSTRUMENTS:
        base = spec.name.replace(".", "_")
        assert any(name.startswith(base) for name in shown), spec.name


def test_every_alert_says_what_and_how_bad() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"].startswith("Warmstart")
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
