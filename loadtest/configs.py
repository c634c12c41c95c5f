"""Pure: the configs the harness generates (the proxy's YAML, nginx's conf)."""

from __future__ import annotations

from pathlib import Path

AUTHORIZATION = "Bearer loadtest"
BODY = '{"amount":2000,"currency":"eur","customer":"cus_loadtest","description":"bench"}'
# The fake upstream's answer to every POST (servers.py's and the nginx one's, --pin)
CREATED = b'{"id":"ch_000001","object":"charge","amount":2000,"currency":"eur","status":"ok"}'
OK = b'{"ok":true}'  # its answer to every GET
BIG_FILE = "big"  # the pinned upstream's 100 MiB answer to POST /big, under its root


def proxy_yaml(*, port: int, admin_port: int, upstream_port: int, data_dir: Path,
               workers: int | str = 1, replay_cache: str | None = None,
               database: str | None = None) -> str:
    """The proxy under test: one guarded route per scenario, defaults everywhere else.

    The database URL comes from IDEMPROXY_DATABASE_URL in the proxy's environment.
    `workers` is set explicitly (1 by default, like the single-process do-nothing proxy
    it is compared with), whatever the proxy's own default.
    """
    lines = [
        f"listen: 127.0.0.1:{port}",
        f"admin: {{listen: '127.0.0.1:{admin_port}'}}",
        f"upstream: {{url: 'http://127.0.0.1:{upstream_port}', connect_timeout: 5s, "
        "timeout: 30s}",
        f"data_dir: '{data_dir}'",
        "logging: {format: json, level: info}",
    ]
    lines.append(f"workers: {workers}")
    if replay_cache is not None:
        lines.append(f"replay_cache: {replay_cache}")
    if database is not None:  # a flow mapping: `database:` settings but the URL
        lines.append(f"database: {database}")
    lines += [
        "routes:",
        "  - name: charges",
        "    match: {methods: [POST], path: /v1/charges}",
        "    require_key: true",
        "  - name: hot",
        "    match: {methods: [POST], path: /v1/hot}",
        "    require_key: true",
        "    concurrent: wait",
        "  - name: big",
        "    match: {methods: [POST], path: /big}",
        "    require_key: true",
    ]
    return "\n".join(lines) + "\n"


def nginx_conf(*, port: int, upstream_port: int, prefix: Path) -> str:
    """nginx as a plain reverse proxy with upstream keep-alive: the C ceiling.

    One worker, like the single-process proxies it is compared with; everything it
    writes stays under `prefix`.
    """
    temp = _temp_paths(prefix, "")
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $proxy_host;
        }}
    }}
}}
"""


def nginx_upstream_conf(*, port: int, prefix: Path, root: Path, workers: int = 1) -> str:
    """nginx as the fake upstream (--pin): the same answers as servers.py's, in C.

    GET (and HEAD) of any path: 200 `{"ok":true}`; any other method: 201 with CREATED,
    the request body read and dropped; `/big`: the file `root/big` (100 MiB of zeros,
    sparse), for POST too, by the usual `error_page 405` redirect to a GET of itself.
    Connections are kept for as many requests as the proxies send (nginx's default
    `keepalive_requests` of 1000 would make them reconnect every 1000 requests).
    """
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx-upstream.pid;
error_log {prefix}/nginx-upstream-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
{_temp_paths(prefix, "upstream_")}
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /{BIG_FILE} {{
            root {root};
            default_type application/octet-stream;
            error_page 405 =200 $uri;
        }}
        location / {{
            if ($request_method !~ ^(GET|HEAD)$) {{
                return 201 '{CREATED.decode()}';
            }}
            return 200 '{OK.decode()}';
        }}
    }}
}}
"""


def _temp_paths(prefix: Path, name: str) -> str:
    """nginx's temp folders under `prefix` (one set per nginx: `name` tells them apart)."""
    return "\n".join(f"    {d}_temp_path {prefix}/{name}{d}_temp;"
                     for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
