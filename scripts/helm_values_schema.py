"""Write deploy/helm/idemproxy/values.schema.json: the chart's own values, described,
plus `config` derived from docs/config.schema.json (the fields the chart sets itself
removed). `python scripts/helm_values_schema.py` rewrites it; tests/test_deploy.py checks
that the committed file is what this produces.

Helm validates values with a JSON Schema draft-07 validator, so the config schema's
`$defs` are carried over as they are (a `$ref` is a JSON pointer either way) and its
2020-12-only keywords (`unevaluatedProperties`) are dropped, and patterns are spelled
for Go's RE2.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_SCHEMA = ROOT / "docs" / "config.schema.json"
OUT = ROOT / "deploy" / "helm" / "idemproxy" / "values.schema.json"
CHART_OWNED = ("listen", "admin", "data_dir")  # set by the chart's templates


def _str(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "description": desc, **kw}


def _bool(desc: str) -> dict[str, Any]:
    return {"type": "boolean", "description": desc}


def _obj(desc: str, props: dict[str, Any] | None = None) -> dict[str, Any]:
    if props is None:
        return {"type": "object", "description": desc}
    return {"type": "object", "description": desc, "additionalProperties": False,
            "properties": props}


def _port(desc: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": 65535, "description": desc}


def _labels(desc: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}, "description": desc}


def chart_values() -> dict[str, Any]:
    monitor = {"enabled": None, "interval": _str("Scrape interval, e.g. 30s."),
               "labels": _labels("Extra labels, to match your Prometheus's selector.")}
    return {
        "mode": _str("standalone: a pool of proxies in front of an existing Service; "
                     "ingress: the app and the proxy in one pod, the proxy in front; "
                     "egress: the app calls out through the proxy, a native sidecar.",
                     enum=["standalone", "ingress", "egress"]),
        "replicaCount": {"type": "integer", "minimum": 0,
                         "description": "Pods: proxies (standalone) or the app's."},
        "image": _obj("The idemproxy image.", {
            "repository": _str("Image repository (build it from the Dockerfile)."),
            "tag": _str("Image tag; empty: the chart's appVersion."),
            "pullPolicy": _str("Image pull policy.",
                               enum=["Always", "IfNotPresent", "Never"])}),
        "imagePullSecrets": {"type": "array", "description": "Secrets to pull images with.",
                             "items": {"type": "object"}},
        "app": _obj("ingress and egress: the application container in the pod.", {
            "name": _str("Container name."),
            "image": _str("The application's image (required in ingress and egress)."),
            "port": _port("ingress: the port the app listens on, on 127.0.0.1."),
            "env": {"type": "array", "items": {"type": "object"},
                    "description": "The app container's environment (EnvVar list)."},
            "resources": _obj("The app container's resources.")}),
        "database": _obj("The PostgreSQL every replica shares.", {
            "existingSecret": _str("An existing Secret with the URL; empty: the chart "
                                   "creates one from url."),
            "urlKey": _str("The URL's key in the Secret."),
            "url": _str("postgresql://user:password@host:5432/db, when the chart creates "
                        "the Secret.")}),
        "adminToken": _obj("The admin listener's bearer token (drain, key operations).", {
            "existingSecret": _str("An existing Secret with the token; empty: the chart "
                                   "creates one."),
            "key": _str("The token's key in the Secret."),
            "value": _str("The token when the chart creates the Secret; empty: random, "
                          "kept across upgrades.")}),
        "config": None,  # from docs/config.schema.json
        "ports": _obj("Container ports.", {
            "http": _port("The proxied port."),
            "admin": _port("The admin port: probes, metrics, drain.")}),
        "drain": _obj("The drain before a pod stops.", {
            "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": 3600,
                               "description": "How long preStop waits for the drain; "
                               "the termination grace is this plus 15 s."}}),
        "readiness": _obj("Readiness.", {
            "requireStore": _bool("Readiness also needs the store (/readyz?store=1). "
                                  "Leave false with one shared store (no cascade).")}),
        "service": _obj("The Service clients call (not in egress mode).", {
            "type": _str("Service type.", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
            "port": _port("Service port.")}),
        "podDisruptionBudget": _obj("A PodDisruptionBudget (when replicaCount > 1).", {
            "enabled": _bool("Render it."),
            "maxUnavailable": {"type": ["integer", "string"],
                               "description": "Pods a voluntary disruption may take."}}),
        "networkPolicy": _obj("A NetworkPolicy for the pods.", {
            "enabled": _bool("Render it."),
            "metricsNamespace": _str("The namespace allowed to reach the admin port.")}),
        "metrics": _obj("Prometheus.", {
            "annotations": _bool("prometheus.io/* pod annotations."),
            "podMonitor": _obj("A PodMonitor (Prometheus Operator).", {
                **monitor, "enabled": _bool("Render it.")}),
            "serviceMonitor": _obj("A ServiceMonitor and a headless admin Service.", {
                **monitor, "enabled": _bool("Render it.")}),
            "prometheusRule": _obj("The alert rules (Prometheus Operator).", {
                "enabled": _bool("Render them."),
                "labels": monitor["labels"]})}),
        "migration": _obj("Schema migrations.", {
            "enabled": _bool("A Job per release revision running `idemproxy migrate`.")}),
        "resources": _obj("The idemproxy container's resources."),
        "podAnnotations": _labels("Extra pod annotations."),
        "podLabels": _labels("Extra pod labels."),
        "nodeSelector": _labels("Node selector."),
        "tolerations": {"type": "array", "items": {"type": "object"},
                        "description": "Tolerations."},
        "affinity": _obj("Affinity."),
    }


def _drop_newer_keywords(node: Any) -> Any:
    """...and spell patterns for Go's RE2, which has \\x00 but no \\u0000."""
    if isinstance(node, dict):
        return {k: (v.replace("\\u0000", "\\x00") if k == "pattern"
                    else _drop_newer_keywords(v)) for k, v in node.items()
                if k not in ("unevaluatedProperties", "$schema", "$id")}
    if isinstance(node, list):
        return [_drop_newer_keywords(v) for v in node]
    return node


def build() -> dict[str, Any]:
    cfg = json.loads(CONFIG_SCHEMA.read_text())
    config = _drop_newer_keywords(copy.deepcopy(cfg))
    defs = config.pop("$defs")
    for owned in CHART_OWNED:
        config["properties"].pop(owned)
    config["description"] = ("The idemproxy configuration (docs/configuration.md); the "
                             "chart sets listen, admin, database.url and data_dir.")
    props = chart_values()
    props["config"] = config
    return {"$schema": "http://json-schema.org/draft-07/schema#",
            "title": "idemproxy Helm chart values", "type": "object",
            "additionalProperties": False, "properties": props, "$defs": defs}


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT.relative_to(ROOT)}\n")
