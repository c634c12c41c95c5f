"""Load a YAML file into a validated `Config`; every problem names its field path.

Example: `routes[2].ttl: '24 hours' is not a duration like 30s, 15m, 24h, 7d`. All problems
in a file are collected and reported together.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.config import upstreams
from proxy.config.checks import check_config, config_warnings
from proxy.config.route_values import parse_response_header
from proxy.config.routes import parse_routes
from proxy.config.schema import (
    Admin,
    Client,
    Config,
    Database,
    Encryption,
    Logging,
    Pooler,
    Sharding,
    Tracing,
)
from proxy.config.values import (
    Reader,
    bool_,
    choice,
    enum_,
    int_in,
    parse_duration,
    parse_listen,
    parse_network,
    parse_size,
    str_,
)
from proxy.errors import ConfigError


def load(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file; raise ConfigError listing every problem.

    A relative `data_dir` is resolved against the config file's folder, so a command run
    from anywhere finds the same embedded database.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not a YAML text file (byte {exc.start} is not "
                           "UTF-8)"]) from None
    if not text.strip() or all(line.lstrip().startswith("#") or not line.strip()
                               for line in text.splitlines()):
        raise ConfigError([f"{path}: the file is empty (a config needs at least "
                           "upstream.url; see config/example.yaml)"])
    cfg = loads(text, env=os.environ if env is None else env, source=str(path))
    return dataclasses.replace(cfg, data_dir=resolve_data_dir(cfg.data_dir, path))


def resolve_data_dir(data_dir: str, config_path: str | Path) -> str:
    """`data_dir` as an absolute path; a relative one counts from the config's folder."""
    expanded = Path(data_dir).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    return str((Path(config_path).resolve().parent / expanded).resolve())


def loads(text: str, *, env: Mapping[str, str], source: str = "<string>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(source, exc)]) from None
    problems: list[str] = []
    r = Reader(problems, env)
    top = r.section(raw, "", {"listen", "admin", "upstream", "database", "defaults", "routes",
                              "data_dir", "workers", "shutdown_grace", "sweep_interval",
                              "replay_cache", "logging", "tracing", "encryption",
                              "allow_python_parser", "client", "upstreams",
                              "trusted_proxies"})
    cfg = _parse_top(r, top, env, source)
    cfg = dataclasses.replace(cfg, upstreams=upstreams.resolve(
        r, cfg.routes, upstreams.parse_upstreams(r, top.get("upstreams")), cfg.upstream))
    if not problems:
        upstreams.check_tls(r, {"upstream": cfg.upstream, **{
            f"upstreams.{n}": u for n, u in cfg.upstreams.items() if "://" not in n}})
    if not problems:
        problems += _check_keys(cfg.encryption.keys_env, env)
        check_config(r, cfg)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, warnings=config_warnings(cfg, top))


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    """`file:LINE:COLUMN: not valid YAML: <problem>`, naming the file (PyYAML's own text
    names `<unicode string>`)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def _parse_top(r: Reader, top: dict[str, Any], env: Mapping[str, str], source: str) -> Config:
    d = Config()
    adm = r.section(top.get("admin"), "admin", {"listen", "token_env"})
    db = r.section(top.get("database"), "database", {"url", "pool_min", "pool_max", "timeout",
                                                    "pooler", "listen_url", "sharding"})
    lg = r.section(top.get("logging"), "logging", {"format", "level"})
    enc = r.section(top.get("encryption"), "encryption", {"keys_env"})
    cl = r.section(top.get("client"), "client", {"header_timeout", "body_timeout",
                                                 "keepalive_timeout", "write_timeout",
                                                 "max_connections", "max_body_memory"})
    db_url = env.get("IDEMPROXY_DATABASE_URL") or r.get(db, "url", "database.url", str_, "")
    listen_url = (env.get("IDEMPROXY_DATABASE_LISTEN_URL")
                  or r.get(db, "listen_url", "database.listen_url", str_, ""))
    pooler = r.get(db, "pooler", "database.pooler", enum_(Pooler), Pooler.NONE)
    if pooler is Pooler.TRANSACTION and not db_url:
        r.report("database.pooler: transaction needs database.url (the pooler's "
                 "address); the embedded PostgreSQL has no pooler")
    return Config(
        listen=r.get(top, "listen", "listen", parse_listen, d.listen),
        admin=Admin(
            listen=r.get(adm, "listen", "admin.listen", parse_listen, d.admin.listen),
            token_env=r.get(adm, "token_env", "admin.token_env", str_, d.admin.token_env)),
        upstream=upstreams.parse_upstream(r, top.get("upstream"), "upstream"),
        client=_parse_client(r, cl),
        database=Database(
            url=db_url,
            pool_min=r.get(db, "pool_min", "database.pool_min", int_in(0, 1000),
                           d.database.pool_min),
            pool_max=r.get(db, "pool_max", "database.pool_max", int_in(1, 1000),
                           d.database.pool_max),
            timeout=r.get(db, "timeout", "database.timeout", parse_duration,
                          d.database.timeout),
            pooler=pooler, listen_url=listen_url,
            sharding=r.get(db, "sharding", "database.sharding", enum_(Sharding),
                           d.database.sharding)),
        routes=parse_routes(r, top.get("routes"), top.get("defaults")),
        data_dir=r.get(top, "data_dir", "data_dir", str_, d.data_dir),
        # The one default that differs from the dataclass's (1, for a Config built in code):
        # a loaded config runs a worker per core unless it says otherwise.
        workers=r.get(top, "workers", "workers", _workers, _workers("auto")),
        shutdown_grace=r.get(top, "shutdown_grace", "shutdown_grace", parse_duration,
                             d.shutdown_grace),
        sweep_interval=r.get(top, "sweep_interval", "sweep_interval", parse_duration,
                             d.sweep_interval),
        replay_cache=r.get(top, "replay_cache", "replay_cache", parse_size, d.replay_cache),
        logging=Logging(
            format=r.get(lg, "format", "logging.format", choice("json", "text"),
                         d.logging.format),
            level=r.get(lg, "level", "logging.level",
                        choice("debug", "info", "warning", "error"), d.logging.level)),
        tracing=_parse_tracing(r, top.get("tracing")),
        encryption=Encryption(keys_env=r.get(enc, "keys_env", "encryption.keys_env",
                                             _env_name, d.encryption.keys_env)),
        allow_python_parser=r.get(top, "allow_python_parser", "allow_python_parser",
                                  bool_, d.allow_python_parser),
        trusted_proxies=r.get(top, "trusted_proxies", "trusted_proxies", _networks,
                              d.trusted_proxies),
        source=source,
    )


def _networks(value: object) -> tuple[str, ...]:
    """trusted_proxies: a list of addresses or CIDRs (10.0.0.0/8, fd00::/8)."""
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of addresses or CIDRs")
    out = []
    for item in value:
        try:
            out.append(str(parse_network(str_(item))))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR like 10.0.0.0/8"
                             ) from None
    return tuple(out)


def _parse_client(r: Reader, cl: dict[str, Any]) -> Client:
    d = Client()
    timeouts = {f: r.get(cl, f, f"client.{f}", _positive_duration, getattr(d, f))
                for f in ("header_timeout", "body_timeout", "keepalive_timeout",
                          "write_timeout")}
    return Client(**timeouts,
                  max_connections=r.get(cl, "max_connections", "client.max_connections",
                                        int_in(1, 1000000), d.max_connections),
                  max_body_memory=r.get(cl, "max_body_memory", "client.max_body_memory",
                                        parse_size, d.max_body_memory))


def _parse_tracing(r: Reader, raw: object) -> Tracing:
    d = Tracing()
    tr = r.section(raw, "tracing", {"enabled", "service_name", "sample_ratio",
                                    "original_trace_header"})
    header = d.original_trace_header
    if "original_trace_header" in tr and tr["original_trace_header"] is None:
        header = None  # null: the replay answer names no original trace
    else:
        header = r.get(tr, "original_trace_header", "tracing.original_trace_header",
                       parse_response_header, header)
    return Tracing(
        enabled=r.get(tr, "enabled", "tracing.enabled", bool_, d.enabled),
        service_name=r.get(tr, "service_name", "tracing.service_name", str_,
                           d.service_name),
        sample_ratio=r.get(tr, "sample_ratio", "tracing.sample_ratio", _ratio,
                           d.sample_ratio),
        original_trace_header=header)


def _ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number from 0 to 1")
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{value!r} is not a number from 0 to 1")
    return ratio


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def _workers(value: object) -> int:
    if value == "auto":  # the cores this process may run on (cgroup/affinity aware)
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    if isinstance(value, str) and value.strip().isdigit():  # e.g. ${IDEMPROXY_WORKERS:-2}
        value = int(value)
    return int_in(1, 256)(value)


def _env_name(value: object) -> str:
    text = str_(value)
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", text):
        raise ValueError(f"{value!r} is not an environment variable name")
    return text


def _check_keys(env_name: str, env: Mapping[str, str]) -> list[str]:
    """The keys the variable holds must parse (checked here so check-config sees them;
    they are parsed again at start-up and never kept in the config)."""
    from proxy.sealing import parse_keys

    try:
        parse_keys(env.get(env_name, ""), source=f"encryption.keys_env: ${env_name}")
    except ConfigError as exc:
        return exc.problems
    return []

