"""The Dockerfile, docker-compose.yml, deploy/kubernetes/ and deploy/grafana/ agree with
the code: ports, health paths, commands, config paths and environment variables.

No container engine runs here, so these files are parsed and cross-checked instead."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from proxy.admin import OPEN_ADMIN_PATHS, create_admin_app
from proxy.cli import build_parser
from proxy.config import Config, loads
from proxy.flow.idempotency import Deps
from proxy.metrics import Metrics
from tests.conftest import ROOT

PROXY_PORT, ADMIN_PORT = Config().listen.port, Config().admin.listen.port
K8S = ROOT / "deploy" / "kubernetes"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPT = next(iter(PYPROJECT["project"]["scripts"]))
CODE = "\n".join(p.read_text() for p in (ROOT / "proxy").rglob("*.py"))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instr(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def admin_paths() -> set[str]:
    """The GET paths the admin app really serves."""
    deps = Deps(store=None, forwarder=None, metrics=Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    app = create_admin_app(Config(), deps)
    return {r.resource.canonical for r in app.router.routes()
            if r.method == "GET" and r.resource is not None}


def url_path_port(command: str) -> tuple[str, int]:
    url = re.search(r"https?://[^'\" ]+", command)
    assert url, command
    parts = urlsplit(url.group(0))
    assert parts.port is not None
    return parts.path, parts.port


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def k8s_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if d]


def k8s(kind: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, kind
    return found[0]


def sidecar() -> dict[str, Any]:
    containers = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == "idemproxy")
    return found


def sidecar_config() -> Config:
    return loads(k8s("ConfigMap")["data"]["config.yaml"], env={
        "IDEMPROXY_DATABASE_URL": "postgresql://u:p@db/idemproxy"})


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- Dockerfile -------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_slim_and_non_root():
    """Two python:3.11-slim stages; the final one runs as a numeric non-root user."""
    froms = instr("FROM")
    assert len(froms) >= 2 and all(f.startswith("python:3.11-slim") for f in froms)
    assert "AS build" in froms[0] and any("--from=build" in c for c in instr("COPY"))
    user = instr("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0


def test_dockerfile_entrypoint_is_the_console_script_serving_the_copied_config():
    """ENTRYPOINT is pyproject's console script; CMD serves a config the image contains."""
    assert json.loads(instr("ENTRYPOINT")[-1]) == [SCRIPT] == ["idemproxy"]
    assert PYPROJECT["project"]["scripts"][SCRIPT] == "proxy.cli:main"
    cmd = json.loads(instr("CMD")[-1])
    assert cmd[0] == "serve" and build_parser().parse_args(cmd).command == "serve"
    config_path = cmd[cmd.index("--config") + 1]
    copies = dict(reversed(c.split()[-2:]) for c in instr("COPY") if "--from" not in c)
    assert config_path in copies and (ROOT / copies[config_path]).is_file()
    env = " ".join(instr("ENV"))
    assert f"IDEMPROXY_CONFIG={config_path}" in env


def test_dockerfile_exposes_the_config_ports_and_checks_admin_health():
    """EXPOSE lists the proxied and admin ports; HEALTHCHECK hits an open admin path."""
    assert set(instr("EXPOSE")[-1].split()) == {str(PROXY_PORT), str(ADMIN_PORT)}
    example = loads((ROOT / "config" / "example.yaml").read_text(), env={})
    assert (example.listen.port, example.admin.listen.port) == (PROXY_PORT, ADMIN_PORT)
    path, port = url_path_port(instr("HEALTHCHECK")[-1])
    assert (path, port) == ("/healthz", ADMIN_PORT)
    assert path in admin_paths() and path in OPEN_ADMIN_PATHS


def test_dockerfile_installs_the_package_with_uvloop_and_copies_what_exists():
    """The image pip-installs the project (uvloop is a dependency and is imported at build);
    every COPY source exists and is not excluded by .dockerignore."""
    assert any("uvloop" in d for d in PYPROJECT["project"]["dependencies"])
    assert any("pip install --no-deps ." in r and "import uvloop" in r for r in instr("RUN"))
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".idemproxy"} <= ignored
    for copy in instr("COPY"):
        if "--from" in copy:
            continue
        *sources, _ = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") not in ignored, src
    assert PYPROJECT["project"]["readme"] in " ".join(instr("COPY"))


# --- docker-compose.yml -----------------------------------------------------------------

def test_compose_runs_postgres_16_the_demo_upstream_and_the_proxy():
    """Three services; the upstream is `python -m proxy.demo_upstream` on 0.0.0.0:9000."""
    services = compose()["services"]
    assert set(services) == {"postgres", "upstream", "proxy"}
    assert services["postgres"]["image"] == "postgres:16"
    up = services["upstream"]
    argv = up["entrypoint"] + up["command"]
    assert argv[:3] == ["python", "-m", "proxy.demo_upstream"]
    assert (ROOT / "proxy" / "demo_upstream.py").is_file()
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert services["proxy"]["command"] == json.loads(instr("CMD")[-1])


def test_compose_healthchecks_and_start_order():
    """Every service has a healthcheck; the proxy starts once both others are healthy."""
    services = compose()["services"]
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
    assert services["proxy"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "upstream": {"condition": "service_healthy"}}
    path, port = url_path_port(" ".join(services["proxy"]["healthcheck"]["test"]))
    assert port == ADMIN_PORT and path in admin_paths() and path in OPEN_ADMIN_PATHS
    up = services["upstream"]
    _, port = url_path_port(" ".join(up["healthcheck"]["test"]))
    assert str(port) == up["command"][up["command"].index("--port") + 1]


def test_compose_proxy_config_points_at_the_other_services():
    """With compose's environment the mounted config listens on 8080/9090 (admin beyond
    loopback, token set), reaches `upstream` and `postgres` with matching credentials."""
    services = compose()["services"]
    proxy, pg = services["proxy"], services["postgres"]
    env = {k: str(v) for k, v in proxy["environment"].items()}
    mount = next(v for v in proxy["volumes"] if v.endswith(":/etc/idemproxy/config.yaml:ro"))
    source = ROOT / mount.split(":")[0]
    env["IDEMPROXY_ADMIN_TOKEN"] = "x"
    cfg = loads(source.read_text(), env=env)
    assert (cfg.listen.port, cfg.admin.listen.port) == (PROXY_PORT, ADMIN_PORT)
    assert not cfg.admin.listen.is_loopback and cfg.admin.token_env in proxy["environment"]
    up = services["upstream"]["command"]
    assert cfg.upstream.url == f"http://upstream:{up[up.index('--port') + 1]}"
    db = urlsplit(cfg.database.url)
    pge = pg["environment"]
    assert (db.hostname, db.port, db.username, db.password, db.path) == (
        "postgres", 5432, pge["POSTGRES_USER"], pge["POSTGRES_PASSWORD"],
        "/" + pge["POSTGRES_DB"])
    published = {p.rsplit(":", 1)[-1] for p in proxy["ports"]}
    assert published == {str(PROXY_PORT), str(ADMIN_PORT)}
    assert any(p.startswith("127.0.0.1:") and p.endswith(f":{ADMIN_PORT}")
               for p in proxy["ports"])
    grace = int(proxy["stop_grace_period"].rstrip("s"))
    assert grace > cfg.shutdown_grace


# --- deploy/kubernetes ------------------------------------------------------------------

def test_kubernetes_sidecar_runs_the_image_command_on_the_mounted_config():
    """App plus idemproxy in one pod; the sidecar serves the ConfigMap's config.yaml."""
    containers = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["app", "idemproxy"]
    side = sidecar()
    assert side["args"] == json.loads(instr("CMD")[-1])
    config_path = Path(side["args"][side["args"].index("--config") + 1])
    mount = next(m for m in side["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volumes = k8s("Deployment")["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == k8s("ConfigMap")["metadata"]["name"]
    assert config_path.name in k8s("ConfigMap")["data"]


def test_kubernetes_ports_and_probes_match_the_config_and_the_admin_app():
    """Container ports are the config's; probes hit /readyz and /healthz on the admin
    port, paths the admin app serves without a token."""
    side, cfg = sidecar(), sidecar_config()
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert ports == {"http": cfg.listen.port, "admin": cfg.admin.listen.port}
    assert (cfg.listen.port, cfg.admin.listen.port) == (PROXY_PORT, ADMIN_PORT)
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = side[probe]["httpGet"]["path"]
        assert path in admin_paths() and path in OPEN_ADMIN_PATHS, probe
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in admin_paths()


def test_kubernetes_admin_beyond_loopback_gets_its_token_from_the_secret():
    """The pod's admin listener is 0.0.0.0, so the token env var comes from the Secret, as
    does IDEMPROXY_DATABASE_URL; both keys exist in the example Secret."""
    side, cfg = sidecar(), sidecar_config()
    assert not cfg.admin.listen.is_loopback
    env, secret = env_of(side), k8s("Secret")
    for var in ("IDEMPROXY_DATABASE_URL", cfg.admin.token_env):
        ref = env[var]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_kubernetes_config_never_falls_back_to_embedded_postgres():
    """Without IDEMPROXY_DATABASE_URL the sidecar's config fails to load (no silent
    embedded database inside a pod)."""
    with pytest.raises(Exception, match="IDEMPROXY_DATABASE_URL"):
        loads(k8s("ConfigMap")["data"]["config.yaml"], env={})


def test_kubernetes_upstream_is_the_app_container_and_the_service_targets_the_proxy():
    """The proxy forwards to the app's port on loopback; the Service targets the proxy."""
    cfg = sidecar_config()
    app = next(c for c in k8s("Deployment")["spec"]["template"]["spec"]["containers"]
               if c["name"] == "app")
    up = urlsplit(cfg.upstream.url)
    assert up.hostname == "127.0.0.1" and up.port == app["ports"][0]["containerPort"]
    assert [p["targetPort"] for p in k8s("Service")["spec"]["ports"]] == ["http"]
    selector = k8s("Service")["spec"]["selector"]
    assert selector.items() <= k8s("Deployment")["spec"]["template"]["metadata"][
        "labels"].items()


def test_kubernetes_grace_user_and_files():
    """Termination grace covers the preStop drain (`idemproxy drain --wait`, bounded by
    shutdown_grace); the sidecar runs as the image's user with a read-only root and
    data_dir on a writable volume; the kustomization lists files that exist."""
    spec, side, cfg = k8s("Deployment")["spec"]["template"]["spec"], sidecar(), \
        sidecar_config()
    command = side["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:4] == [SCRIPT, "drain", "--wait", "--timeout"]
    drain = int(command[4].rstrip("s"))
    assert drain <= cfg.shutdown_grace < spec["terminationGracePeriodSeconds"]
    assert str(side["securityContext"]["runAsUser"]) == instr("USER")[-1].split(":")[0]
    assert side["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(cfg.data_dir.startswith(m["mountPath"]) for m in side["volumeMounts"]
               if not m.get("readOnly"))
    assert cfg.workers == 1
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).is_file() for r in kust["resources"])
    assert "secret.example.yaml" not in kust["resources"]


def test_kubernetes_config_passes_the_json_schema():
    """The ConfigMap's config validates against docs/config.schema.json."""
    schema = json.loads((ROOT / "docs" / "config.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(
        yaml.safe_load(k8s("ConfigMap")["data"]["config.yaml"]))


# --- environment variables --------------------------------------------------------------

def test_every_idemproxy_env_var_set_in_packaging_is_read_somewhere():
    """Each IDEMPROXY_* variable the Dockerfile, compose or Kubernetes sets is read by the
    code or referenced as ${VAR} by the config file it runs with."""
    example = (ROOT / "config" / "example.yaml").read_text()
    sets: dict[str, str] = {}
    for rest in instr("ENV"):
        for word in shlex.split(rest):
            sets[word.split("=")[0]] = example
    for var in compose()["services"]["proxy"]["environment"]:
        sets[var] = example
    for var in env_of(sidecar()):
        sets[var] = k8s("ConfigMap")["data"]["config.yaml"]
    for var, config_text in sets.items():
        if var.startswith("IDEMPROXY_"):
            assert f'"{var}"' in CODE or f"${{{var}" in config_text, var
    assert {"IDEMPROXY_CONFIG", "IDEMPROXY_DATABASE_URL"} <= set(sets)
    assert '"IDEMPROXY_CONFIG"' in CODE and '"IDEMPROXY_DATABASE_URL"' in CODE


# --- deploy/grafana ---------------------------------------------------------------------

def exported_names() -> set[str]:
    """Every sample name proxy/metrics.py exports (counters' _total, histograms' _bucket)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ["_total", "_created"], "histogram": [
            "_bucket", "_sum", "_count", "_created"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads((ROOT / "deploy" / "grafana" / "idemproxy.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


def test_the_dashboard_queries_only_exported_metrics():
    """Every idemproxy_* series the Grafana dashboard queries is exported."""
    queried = {m for e in dashboard_exprs() for m in re.findall(r"idemproxy_\w+", e)}
    assert queried and queried <= exported_names(), queried - exported_names()


def test_the_dashboard_shows_every_metric():
    """Every metric family proxy/metrics.py exports has a panel."""
    queried = " ".join(dashboard_exprs())
    registry = CollectorRegistry()
    Metrics(registry)
    missing = [f.name for f in registry.collect() if f.name not in queried]
    assert not missing


def test_the_dashboard_filters_only_on_exported_labels():
    """Label matchers and by() clauses in the dashboard use labels the metrics have."""
    labels = set()
    for e in dashboard_exprs():
        labels |= set(re.findall(r"(\w+)=~?\"", e))
        for group in re.findall(r"by \(([^)]*)\)", e):
            labels |= {g.strip() for g in group.split(",")}
    assert labels <= {"route", "outcome", "op", "le", "version"}


def test_the_image_needs_a_database_url_or_an_explicit_embedded_opt_in():
    """The image sets IDEMPROXY_EMBEDDED_DATABASE=0 (serve then refuses to start without
    a URL, see test_cli), and compose gives the proxy its shared Postgres."""
    env = shlex.split(" ".join(instr("ENV")))
    assert "IDEMPROXY_EMBEDDED_DATABASE=0" in env
    assert compose()["services"]["proxy"]["environment"]["IDEMPROXY_DATABASE_URL"]
