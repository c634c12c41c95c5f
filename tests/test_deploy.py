"""deploy/kubernetes/ and the Helm chart (deploy/helm/idemproxy) render and validate
against the Kubernetes schemas (kubernetes-validate, offline, strict: an unknown field is
an error), with default and non-default values, and agree with the code: the rendered
config loads, probes and hooks hit paths the admin app serves, alerts query exported
metrics. No cluster: `helm` (scripts/install-helm.sh) and `kubectl kustomize`
(scripts/install-kubectl.sh), both installed by `make test`."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxy.config import loads
from tests.conftest import ROOT
from tests.test_packaging import admin_paths, exported_names

CHART = ROOT / "deploy" / "helm" / "idemproxy"
K8S = ROOT / "deploy" / "kubernetes"
KUBE_VERSION = "1.29.0"  # native sidecars (initContainers restartPolicy: Always)
SELECTOR_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
STANDARD_LABELS = SELECTOR_LABELS | {"app.kubernetes.io/version",
                                     "app.kubernetes.io/managed-by", "helm.sh/chart"}
DB_ENV = {"IDEMPROXY_DATABASE_URL": "postgresql://u:p@db/idemproxy"}

# The Prometheus Operator's kinds have no schema in kubernetes-validate: the fields these
# manifests use, checked here (apiVersion monitoring.coreos.com/v1).
_META = {"type": "object", "required": ["name"]}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^\d+[smh]$"}}}
_SELECTOR = {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
             "properties": {"matchLabels": {"type": "object"}}}
_RULE = {"type": "object", "additionalProperties": False, "required": ["alert", "expr"],
         "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z]+$"},
                        "expr": {"type": "string"}, "for": {"type": "string"},
                        "labels": {"type": "object"}, "annotations": {
                            "type": "object", "required": ["summary", "description"]}}}
CRDS: dict[str, dict[str, Any]] = {
    kind: {"type": "object", "additionalProperties": False,
           "required": ["apiVersion", "kind", "metadata", "spec"],
           "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
                          "kind": {"const": kind}, "metadata": _META, "spec": spec}}
    for kind, spec in {
        "PodMonitor": {"type": "object", "additionalProperties": False,
                       "required": ["selector", "podMetricsEndpoints"],
                       "properties": {"selector": _SELECTOR, "podMetricsEndpoints": {
                           "type": "array", "minItems": 1, "items": _ENDPOINT}}},
        "ServiceMonitor": {"type": "object", "additionalProperties": False,
                           "required": ["selector", "endpoints"],
                           "properties": {"selector": _SELECTOR, "endpoints": {
                               "type": "array", "minItems": 1, "items": _ENDPOINT}}},
        "PrometheusRule": {"type": "object", "additionalProperties": False,
                           "required": ["groups"], "properties": {"groups": {
                               "type": "array", "minItems": 1, "items": {
                                   "type": "object", "required": ["name", "rules"],
                                   "properties": {"name": {"type": "string"}, "rules": {
                                       "type": "array", "items": _RULE}}}}}},
    }.items()}

# Non-default values: each mode with everything switched on.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ingress-everything": {
        "mode": "ingress", "app": {"image": "registry.example.com/api:1", "port": 8000},
        "database": {"existingSecret": "pg"}, "adminToken": {"value": "t0ken"},
        "readiness": {"requireStore": True}, "networkPolicy": {"enabled": True},
        "migration": {"enabled": True}, "replicaCount": 3,
        "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "serviceMonitor": {"enabled": True},
                    "prometheusRule": {"enabled": True}},
        "config": {"upstream": {"timeout": "10s"}, "routes": [
            {"name": "charges", "match": {"methods": ["POST"], "path": "/v1/charges"},
             "require_key": True, "ttl": "48h"}]}},
    "egress": {
        "mode": "egress", "app": {"image": "registry.example.com/worker:2",
                                  "env": [{"name": "API", "value": "http://127.0.0.1:8080"}]},
        "database": {"url": "postgresql://u:p@db/x"}, "replicaCount": 1,
        "config": {"upstream": {"url": "https://api.stripe.com"}, "routes": [
            {"name": "stripe", "match": {"methods": ["POST"], "path": "/v1/*"},
             "preset": "stripe", "tenant": "none"}]}},
    "standalone-monitored": {
        "image": {"tag": "9.9.9"}, "drain": {"timeoutSeconds": 50},
        "metrics": {"annotations": False, "serviceMonitor": {"enabled": True},
                    "prometheusRule": {"enabled": True}},
        "config": {"trusted_proxies": ["10.0.0.0/8"], "workers": 2}},
}


def _tool(name: str) -> str:
    """The tool `make test` installs: helm into the venv, kubectl from Debian."""
    local = Path(sys.prefix) / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is missing: `make test` installs it (scripts/install-{name}.sh)"
    return found


def _run(*args: str) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@functools.cache
def helm_render(name: str, values_json: str) -> list[dict[str, Any]]:
    out = subprocess.run([_tool("helm"), "template", "rel", str(CHART), "--kube-version",
                          KUBE_VERSION, "--namespace", "payments", "--values", "-"],
                         input=values_json, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{name}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(name: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    values = {**VALUE_SETS[name], **(extra or {})}
    return helm_render(name, json.dumps(values))


def kustomize(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_run(_tool("kubectl"), "kustomize", str(path)))
            if d]


def validate(doc: dict[str, Any]) -> None:
    """Against the Kubernetes schema of KUBE_VERSION (strict), or our CRD subset."""
    if doc["kind"] in CRDS:
        jsonschema.Draft202012Validator(CRDS[doc["kind"]]).validate(doc)
        return
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def pod_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def proxy_container(pod: dict[str, Any]) -> dict[str, Any]:
    every = pod.get("initContainers", []) + pod["containers"]
    found: dict[str, Any] = next(c for c in every if c["name"] == "idemproxy")
    return found


def config_of(docs: list[dict[str, Any]]) -> Any:
    return loads(one(docs, "ConfigMap")["data"]["config.yaml"], env=DB_ENV)


# --- the chart --------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints(name: str, tmp_path: Path):
    """`helm lint --strict` passes with default and non-default values."""
    values = tmp_path / "values.json"
    values.write_text(json.dumps(VALUE_SETS[name]))
    _run(_tool("helm"), "lint", "--strict", str(CHART), "--values", str(values))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_renders_valid_objects_with_a_loadable_config(name: str):
    """Every rendered object passes its Kubernetes schema, carries the standard labels,
    and the ConfigMap holds a config idemproxy loads, on the ports the pod declares."""
    docs = render(name)
    for doc in docs:
        validate(doc)
        assert STANDARD_LABELS <= doc["metadata"]["labels"].keys(), doc["kind"]
    cfg, side = config_of(docs), proxy_container(pod_of(docs))
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert ports["admin"] == cfg.admin.listen.port and not cfg.admin.listen.is_loopback
    assert ports.get("http", cfg.listen.port) == cfg.listen.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert side[probe]["httpGet"]["path"].partition("?")[0] in admin_paths()


def test_chart_modes_order_the_shutdown():
    """ingress: the proxy's preStop drains and the app's waits on /drainz; egress: the
    proxy is a native sidecar with no Service; standalone: the proxy alone, draining."""
    ingress = pod_of(render("ingress-everything"))
    app, side = ingress["containers"]
    assert (app["name"], side["name"]) == ("app", "idemproxy")
    assert app["lifecycle"]["preStop"]["httpGet"] == {"path": "/drainz?wait=25s",
                                                      "port": 9090}
    assert side["lifecycle"]["preStop"]["exec"]["command"] == [
        "idemproxy", "drain", "--wait", "--timeout", "25s"]
    assert side["readinessProbe"]["httpGet"]["path"] == "/readyz?store=1"
    assert config_of(render("ingress-everything")).upstream.url == "http://127.0.0.1:8000"
    egress_docs = render("egress")
    egress = pod_of(egress_docs)
    assert [c["name"] for c in egress["initContainers"]] == ["idemproxy"]
    assert egress["initContainers"][0]["restartPolicy"] == "Always"
    assert "lifecycle" not in egress["initContainers"][0]
    assert not any(d["kind"] == "Service" for d in egress_docs)
    assert config_of(egress_docs).listen.host == "127.0.0.1"
    standalone = pod_of(render("standalone-monitored"))
    assert [c["name"] for c in standalone["containers"]] == ["idemproxy"]
    assert standalone["terminationGracePeriodSeconds"] == 65
    assert standalone["containers"][0]["image"].endswith(":9.9.9")


def test_chart_config_change_rolls_the_pods():
    """checksum/config changes with the config and only with it."""
    def checksum(extra: dict[str, Any]) -> str:
        docs = render("defaults", extra)
        value: str = one(docs, "Deployment")["spec"]["template"]["metadata"][
            "annotations"]["checksum/config"]
        return value
    base = checksum({})
    assert checksum({"replicaCount": 5}) == base
    assert checksum({"config": {**VALUE_SETS["defaults"], "workers": 2}}) != base


def test_chart_values_schema_refuses_bad_values():
    """values.schema.json carries the config's schema: a bad duration deep in a route, or
    an unknown mode, fails the render naming the value."""
    for values, message in (({"mode": "sidecar"}, "mode"),
                            ({"config": {"routes": [{"name": "a", "match": {"path": "/"},
                                                     "ttl": "24 hours"}]}},
                             "config.routes.0.ttl")):
        out = subprocess.run([_tool("helm"), "template", "rel", str(CHART), "--kube-version",
                              KUBE_VERSION, "--values", "-"], input=json.dumps(values),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and message in out.stderr, out.stderr


def test_chart_values_schema_is_derived_from_the_config_schema():
    """The committed values.schema.json is what scripts/helm_values_schema.py makes of
    docs/config.schema.json (run it after changing either)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import helm_values_schema
    finally:
        sys.path.pop(0)
    assert (CHART / "values.schema.json").read_text() == helm_values_schema.render()


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaves(v, f"{prefix}.{k}".lstrip("."))]
    return [prefix]


def test_every_chart_value_is_documented():
    """Each value in values.yaml has a description in values.schema.json, and each
    top-level value is named in deploy/kubernetes/README.md's values table."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (K8S / "README.md").read_text()
    for path in _leaves({k: v for k, v in values.items() if k != "config"}):
        node = schema
        for part in path.split("."):
            if "properties" not in node:
                break  # a free-form object (resources, ...): described as a whole
            node = node["properties"][part]
        assert node.get("description"), path
    for key in values:
        assert f"`{key}`" in readme or f"`{key}." in readme, key


def test_chart_alerts_are_the_kubernetes_ones():
    """The chart's alert rules and deploy/kubernetes/monitoring/'s are the same rules."""
    chart = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    rule = one(kustomize(K8S / "monitoring"), "PrometheusRule")
    assert rule["spec"] == chart
    assert one(render("standalone-monitored"), "PrometheusRule")["spec"] == chart


# --- deploy/kubernetes ------------------------------------------------------------------

KUSTOMIZATIONS = ["", "egress", "standalone", "monitoring"]


@pytest.mark.parametrize("sub", KUSTOMIZATIONS, ids=lambda s: s or "ingress")
def test_kustomizations_render_and_validate(sub: str):
    """`kubectl kustomize` of each folder renders objects that pass their schemas; every
    ConfigMap holds a config idemproxy loads."""
    docs = kustomize(K8S / sub)
    assert docs
    for doc in docs:
        validate(doc)
        if doc["kind"] == "ConfigMap":
            loads(doc["data"]["config.yaml"], env=DB_ENV)


def test_kubernetes_egress_is_a_native_sidecar_and_ingress_drains_in_order():
    """egress/: the proxy is an init container with restartPolicy: Always, ready before
    the app starts; ingress: the app's preStop waits on the proxy's /drainz."""
    egress = pod_of(kustomize(K8S / "egress"))
    side = egress["initContainers"][0]
    assert side["restartPolicy"] == "Always" and side["startupProbe"]["httpGet"][
        "path"] == "/readyz"
    ingress = pod_of(kustomize(K8S))
    app = next(c for c in ingress["containers"] if c["name"] == "app")
    hook = app["lifecycle"]["preStop"]["httpGet"]
    assert hook["path"].startswith("/drainz?wait=") and "/drainz" in admin_paths()
    assert hook["port"] == proxy_container(ingress)["ports"][1]["containerPort"]


def test_alerts_query_only_exported_metrics():
    """Every idemproxy_* series an alert uses is exported, and every alert is specific
    (a severity, a summary, a description)."""
    rule = one(kustomize(K8S / "monitoring"), "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 5
    for r in rules:
        used = set(re.findall(r"idemproxy_\w+", r["expr"]))
        assert used and used <= exported_names(), (r["alert"], used - exported_names())
        assert r["labels"]["severity"] in ("critical", "warning")


def test_validation_catches_a_misspelled_field():
    """The strict schemas reject an unknown field (so the checks above can fail)."""
    pod = kustomize(K8S / "egress")
    deployment = one(pod, "Deployment")
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
