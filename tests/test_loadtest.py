"""The load harness's pure parts: parsing tool output, ratios and verdicts, generated
configs. No timing thresholds here, ever: the benchmark itself reports the ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import bench, cli, configs, layout, pgbench, profile, report, stats, wrk
from loadtest.clients import parse_outcomes
from loadtest.configs import AUTHORIZATION, CREATED, OK, nginx_conf, proxy_yaml
from proxy.config import Concurrent, loads

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:1234
  1 threads and 50 connections
Requests/sec:   4000.00
WRK_JSON {"requests":20000,"duration_us":5000000,"bytes":1,"connect":0,"read":1,"write":0,\
"status":3,"timeout":2,"mean":12500.0,"max":90000,"p50":10000,"p90":20000,"p99":45000,\
"p999":80000}
"""

PGBENCH_OUTPUT = """transaction type: first.sql
number of transactions actually processed: 18000
number of failed transactions: 0 (0.000%)
latency average = 2.612 ms
initial connection time = 12.010 ms
tps = 3829.123456 (without initial connection time)
"""


def test_wrk_parse_reads_the_summary_line() -> None:
    """wrk's output becomes req/s, millisecond percentiles and error counts."""
    r = wrk.parse(WRK_OUTPUT)
    assert r.requests == 20000 and r.rps == 4000.0
    assert (r.p50_ms, r.p99_ms, r.p999_ms, r.mean_ms) == (10.0, 45.0, 80.0, 12.5)
    assert r.errors == 3 and r.non_2xx == 3


def test_wrk_parse_without_summary_fails_loudly() -> None:
    """Output without our summary line (a crashed script) is an error, not zeros."""
    with pytest.raises(ValueError, match="WRK_JSON"):
        wrk.parse("Running 5s test\nunable to connect\n")


@pytest.mark.parametrize("scenario", ["get", "first", "replay", "hot", "replay_paced",
                                      "first_paced", "pass_post", "pass_post_paced",
                                      "get_paced"])
def test_wrk_scripts_carry_the_summary_and_credentials(scenario: str) -> None:
    """Every scenario script gets the shared done() and the substituted Authorization."""
    text = wrk.script_text(scenario)
    assert "function done(" in text and "WRK_JSON" in text
    assert AUTHORIZATION in text and "__AUTH__" not in text and "__BODY__" not in text


def test_pgbench_parse() -> None:
    """pgbench's tps and mean latency are read from its summary."""
    r = pgbench.parse(PGBENCH_OUTPUT)
    assert (r.tps, r.latency_ms, r.failed) == (3829.123456, 2.612, 0)
    with pytest.raises(ValueError):
        pgbench.parse("pgbench: error: connection refused")


def test_pgbench_scripts_use_the_proxys_functions() -> None:
    """The scripts run idemproxy_claim/complete, chain the token, and keep ':' out of literals."""
    first, replay = pgbench.first_script(), pgbench.replay_script(500)
    batched = pgbench.first_batch_script(4)
    assert "idemproxy_claim_many(" in batched and "idemproxy_complete_many(" in batched
    assert "ARRAY[4]" in batched and ":toks" in batched
    assert "idemproxy_claim(" in first and "idemproxy_complete(" in first
    assert "\\gset" in first and ":tok" in first
    assert "random(1, 500)" in replay
    filled = pgbench.fill_sql(scope=pgbench.REPLAY_SCOPE, prefix="r", count=10)
    for text in (first, replay, batched, filled):
        literals = text.split("'")[1::2]
        assert not any(":" in lit for lit in literals)


def test_summary_median_and_spread() -> None:
    """The median of the runs and their spread as a share of it."""
    s = stats.summarize([100.0, 120.0, 80.0])
    assert (s.median, s.low, s.high, s.n) == (100.0, 80.0, 120.0, 3)
    assert s.spread_pct == pytest.approx(40.0)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_paired_ratios_are_round_by_round() -> None:
    """Ratios pair each round's runs, skipping a zero baseline."""
    assert stats.paired_ratios([10.0, 30.0, 5.0], [5.0, 10.0, 0.0]) == [2.0, 3.0]


def _runs(proxy_replay: float, proxy_first: float, p99: float) -> report.Runs:
    def r(rps: float, p99_ms: float = 10.0) -> dict[str, float]:
        return {"rps": rps, "p50_ms": 1.0, "p99_ms": p99_ms}

    return {
        "noop get": [r(1000), r(1000)], "proxy get": [r(960), r(980)],
        "noop post": [r(1000), r(800)], "proxy replay": [r(proxy_replay), r(proxy_replay)],
        "proxy first": [r(proxy_first), r(proxy_first)],
        "noop post paced": [r(500, 8.0)], "proxy replay paced": [r(500, p99)],
        "pgbench first": [{"rps": 3000.0, "mean_ms": 2.5}],
    }


def test_report_ratios_and_verdicts() -> None:
    """Each target compares idemproxy with the do-nothing proxy's same-shaped request."""
    table = report.rows(_runs(proxy_replay=2000.0, proxy_first=500.0, p99=6.0))
    by = {r.name: r for r in table}
    assert by["proxy get"].ratio is not None and by["proxy get"].ratio.median == 0.97
    assert by["proxy replay"].ratio is not None
    assert by["proxy replay"].ratio.median == pytest.approx(2.25)  # median of 2.0, 2.5
    assert by["pgbench first"].p50_ms == 2.5  # pgbench's mean latency
    checks = {c["target"]: c for c in report.verdicts(table, rss_growth_mib=12.0)}
    assert checks["pass-through"]["met"] is True
    assert checks["replays"]["met"] is True
    assert checks["first requests"]["met"] is False
    assert checks["replay p99 at the same load"]["value"] == 0.75
    assert checks["100 MiB body, RSS growth"]["met"] is True
    text = report.render(table, list(checks.values()))
    assert "| idemproxy replays |" in text and "**no**" in text


def test_paced_runs_compare_with_the_noops_same_shape_and_load() -> None:
    """Paced GETs against the noop's paced GETs, paced POSTs (first requests, pass-through)
    against its paced POSTs; p50 and p99 ratios round by round, with #19's verdicts."""
    def r(p50: float, p99: float) -> dict[str, float]:
        return {"rps": 500.0, "p50_ms": p50, "p99_ms": p99}

    table = report.rows({
        "noop post paced": [r(2.0, 10.0)], "noop get paced": [r(1.0, 4.0)],
        "proxy first paced": [r(3.0, 16.0)], "proxy pass post paced": [r(1.0, 5.0)],
        "proxy get paced": [r(0.5, 6.0)]})
    by = {row.name: row for row in table}
    assert report.baseline_of("proxy get paced") == "noop get paced"
    assert by["proxy get paced"].p50_ratio is not None
    assert by["proxy get paced"].p50_ratio.median == 0.5
    assert by["proxy first paced"].p99_ratio is not None
    assert by["proxy first paced"].p99_ratio.median == 1.6
    checks = {c["target"]: c for c in report.verdicts(table, rss_growth_mib=None)}
    assert checks["first-request p99 at the same load"]["met"] is False
    assert checks["pass-through (POST) p99 at the same load"]["met"] is True
    assert checks["pass-through (GET) p99 at the same load"]["met"] is False
    assert "| 0.50 | 1.50 |" in report.render(table, list(checks.values()))


def test_report_marks_targets_not_run() -> None:
    """A scenario that did not run is 'not run', never a pass."""
    checks = report.verdicts(report.rows({"noop get": [{"rps": 1.0}]}), rss_growth_mib=None)
    assert all(c["met"] is None for c in checks)


def test_big_table_slowdown_is_relative_to_the_noop() -> None:
    """The 10M-key slowdown compares ratios to the noop, so machine drift cancels."""
    runs = dict(_runs(proxy_replay=2000.0, proxy_first=500.0, p99=6.0))
    runs["noop post bigtable"] = [{"rps": 500.0}]
    runs["proxy replay bigtable"] = [{"rps": 950.0}]
    table = report.rows(runs)
    slow = report.big_table_slowdown({r.name: r for r in table}, "proxy replay")
    assert slow == pytest.approx(1 - 1.9 / 2.25)
    checks = report.verdicts(table, rss_growth_mib=None, big_table_rows=10_000_000)
    big = [c for c in checks if "10,000,000 more keys" in c["target"]]
    assert len(big) == 1 and big[0]["met"] is True  # 15.6 % slower
    assert "big table" in report.render(table, checks)


def test_proxy_yaml_is_a_valid_idemproxy_config(tmp_path: Path) -> None:
    """The generated config passes the proxy's own loader, on loopback only."""
    cfg = loads(proxy_yaml(port=18001, admin_port=18002, upstream_port=18003,
                           data_dir=tmp_path), env={})
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 18001)
    assert cfg.admin.listen.is_loopback and cfg.upstream.url == "http://127.0.0.1:18003"
    routes = {r.name: r for r in cfg.routes}
    assert routes["charges"].require_key and routes["hot"].concurrent is Concurrent.WAIT
    assert routes["big"].max_stored_body >= 100 * 2**20


def test_nginx_conf_keeps_upstream_connections_alive(tmp_path: Path) -> None:
    """nginx listens on loopback, reuses upstream connections, writes only under prefix."""
    conf = nginx_conf(port=18004, upstream_port=18003, prefix=tmp_path)
    assert "listen 127.0.0.1:18004;" in conf and "server 127.0.0.1:18003;" in conf
    assert "keepalive 64;" in conf and 'proxy_set_header Connection "";' in conf
    assert "proxy_http_version 1.1;" in conf and "daemon off;" in conf
    paths = [w.rstrip(";") for w in conf.split() if w.startswith("/") and w != "/"]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)


def test_parse_outcomes_reads_labels_in_any_order() -> None:
    """The proxy's request counters become route/outcome counts."""
    text = ('idemproxy_requests_total{outcome="replayed",route="charges"} 3.0\n'
            'idemproxy_requests_created{outcome="replayed",route="charges"} 1.7e+09\n'
            'idemproxy_requests_total{route="hot",outcome="forwarded"} 1.0\n')
    assert parse_outcomes(text) == {"charges/replayed": 3, "hot/forwarded": 1}


def test_profile_top_costs() -> None:
    """Collapsed stacks become self and inclusive shares per function."""
    collapsed = ("main (a.py:1);handle (proxy/flow/idempotency.py:10);claim (proxy/s.py:3) 6\n"
                 "main (a.py:1);handle (proxy/flow/idempotency.py:12) 3\n"
                 "main (a.py:1);log (proxy/logs.py:7) 1\n")
    top = profile.top_costs(collapsed)
    assert top["samples"] == 10
    assert ("claim (proxy/s.py)", 60.0) in top["self"]
    assert ("handle (proxy/flow/idempotency.py)", 90.0) in top["inclusive"]
    # the entry frame is on every stack: no inclusive share, it says nothing
    assert "main (a.py)" not in dict(top["inclusive"])


def test_proxy_yaml_can_turn_the_replay_cache_off(tmp_path: Path) -> None:
    """The harness's second proxy replays from the database only."""
    on = loads(proxy_yaml(port=1, admin_port=2, upstream_port=3, data_dir=tmp_path), env={})
    off = loads(proxy_yaml(port=1, admin_port=2, upstream_port=3, data_dir=tmp_path,
                           replay_cache="0"), env={})
    assert on.replay_cache > 0 and off.replay_cache == 0


def test_pin_splits_two_cores_load_then_proxies() -> None:
    """Two cores: 0 for wrk, the upstream and Postgres, 1 for the proxies."""
    got = layout.split({0, 1})
    assert (got.load, got.proxies) == ((0,), (1,))
    assert "core 0" in got.describe() and "proxies on core 1" in got.describe()


@pytest.mark.parametrize(("cpus", "load", "proxies"), [
    ({0, 1, 2, 3}, (0, 1), (2, 3)),
    ({0, 1, 2}, (0,), (1, 2)),  # an odd core goes to the proxies
    ({2, 5, 7, 9}, (2, 5), (7, 9)),  # the cores this process may use, not 0..N-1
])
def test_pin_splits_more_cores_half_and_half(cpus: set[int], load: tuple[int, ...],
                                             proxies: tuple[int, ...]) -> None:
    """N cores: the lower half (rounded down) for the load side, the rest for the proxies."""
    got = layout.split(cpus)
    assert (got.load, got.proxies) == (load, proxies)
    assert not set(got.load) & set(got.proxies)


def test_pin_refuses_one_core() -> None:
    """One usable core cannot be split: a clear error, not a layout that shares it."""
    with pytest.raises(layout.PinError, match="at least 2 usable cores"):
        layout.split({0})


def test_pin_flag_refused_on_one_core(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m loadtest --pin` on a 1-core machine exits 2 with the reason."""
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--pin"])
    assert exc.value.code == 2
    assert "--pin needs at least 2 usable cores" in capsys.readouterr().err


def test_pin_flag_sizes_auto_workers_to_the_proxies_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--pin --workers auto`: one worker per proxy-side core; unpinned, per core."""
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    pinned = cli.parse_args(["--pin", "--workers", "auto"])
    assert pinned.pin and pinned.workers == 2
    assert not cli.parse_args([]).pin


def test_cpu_lists_in_the_kernels_format() -> None:
    """Cores print as /proc's Cpus_allowed_list does, and read back."""
    assert layout.cpu_list([5, 0, 1, 2]) == "0-2,5"
    assert layout.cpu_list([1]) == "1"
    assert layout.parse_cpu_list("0-2,5\n") == (0, 1, 2, 5)
    assert layout.taskset([1], ["nginx", "-c", "x"]) == ["taskset", "-c", "1", "nginx",
                                                         "-c", "x"]


def test_cpus_allowed_reads_this_process() -> None:
    """What the kernel applied to a process, in the list format."""
    import os

    allowed = layout.cpus_allowed(os.getpid())
    assert allowed is not None
    assert set(layout.parse_cpu_list(allowed)) == os.sched_getaffinity(0)


def test_nginx_upstream_answers_the_fake_upstreams_shapes(tmp_path: Path) -> None:
    """The C upstream: GET 200 {"ok":true}, other methods 201 CREATED, /big a file it
    serves to a POST too; connections kept; everything it writes under prefix."""
    conf = configs.nginx_upstream_conf(port=18005, prefix=tmp_path, root=tmp_path / "root",
                                       workers=2)
    assert "listen 127.0.0.1:18005" in conf and "worker_processes 2;" in conf
    assert f"return 201 '{CREATED.decode()}';" in conf
    assert f"return 200 '{OK.decode()}';" in conf
    assert "if ($request_method !~ ^(GET|HEAD)$)" in conf
    assert "location = /big" in conf and f"root {tmp_path / 'root'};" in conf
    assert "error_page 405 =200 $uri;" in conf  # POST /big served as the file
    assert "default_type application/json;" in conf and "keepalive_requests 100000000;" in conf
    paths = [w.rstrip(";") for w in conf.split() if w.startswith("/") and w != "/"
             and w not in ("/big",)]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    # not the nginx proxy baseline's temp folders: the two run side by side
    base = nginx_conf(port=18004, upstream_port=18005, prefix=tmp_path)
    temp = {w for w in conf.split() if w.endswith("_temp;")}
    assert temp and not temp & {w for w in base.split() if w.endswith("_temp;")}


def test_profile_covers_every_path() -> None:
    """--profile samples pass-through GET and POST, first requests, and replays from the
    cache and from the database (the replay_cache: 0 proxy)."""
    paths = {name: (target, scenario) for name, target, scenario in bench.PROFILE_PATHS}
    assert paths == {"get": ("proxy", "get"), "pass_post": ("proxy", "pass_post"),
                     "first": ("proxy", "first"), "replay": ("proxy", "replay"),
                     "replay_db": ("proxy-db", "replay")}
    assert set(bench.PROFILE_LABELS) == set(paths)
    assert {target for target, _ in paths.values()} <= set(bench.PROXIES)


def test_layout_summary_names_the_sides_and_the_applied_cores() -> None:
    """The printed layout says which cores each side got and what Postgres' backends
    actually run on; unpinned says so."""
    pinned = {"pinned": True, "load": "0", "proxies": "1", "harness": "0",
              "upstream": "nginx return (C)", "processes": {"proxy": ["1"], "upstream": ["0"]},
              "postgres": {"postmaster": "0", "backends": {"0": 14}}}
    text = cli.describe(pinned)
    assert "load side on core 0" in text and "proxies on core 1" in text
    assert "backends 14 on 0" in text and "proxy 1" in text
    assert cli.describe({"pinned": False, "upstream": "aiohttp"}).startswith("unpinned")


def test_sealed_runs_are_reported_against_the_unsealed_proxy() -> None:
    """--sealed: each sealed measurement is a round-by-round ratio to the same shape on
    the plain proxy, reported with no bound (it is what sealing costs)."""
    runs = {"noop post": [{"rps": 100.0}] * 2,
            "proxy first": [{"rps": 60.0}, {"rps": 50.0}],
            "sealed first": [{"rps": 54.0}, {"rps": 50.0}]}
    checks = {c["target"]: c for c in report.verdicts(report.rows(runs), rss_growth_mib=None,
                                                       runs=runs)}
    sealed = checks["idemproxy first requests, sealed (encryption keys set) vs unsealed"]
    assert sealed["value"] == 0.95 and sealed["met"] is None
    assert "| - |" in report.render(report.rows(runs), list(checks.values()))


def test_citus_runs_are_reported_against_the_proxy_on_one_node() -> None:
    """--citus: each Citus measurement is a round-by-round ratio to the same shape on one
    node, reported with no bound (what the coordinator's hop costs)."""
    runs = {"noop post": [{"rps": 100.0}] * 2,
            "proxy replay": [{"rps": 80.0}, {"rps": 100.0}],
            "citus replay": [{"rps": 20.0}, {"rps": 30.0}]}
    checks = {c["target"]: c for c in report.verdicts(report.rows(runs), rss_growth_mib=None,
                                                       runs=runs)}
    citus = checks["idemproxy replays, Citus coordinator + 2 workers vs one node"]
    assert citus["value"] == 0.275 and citus["met"] is None
    assert "Citus coordinator + 2 workers" in report.render(report.rows(runs),
                                                            list(checks.values()))


def test_report_cpu_per_request_column() -> None:
    """CPU per request is reported per row, and its ratio is the baseline's CPU over the
    proxy's round by round (less CPU per request: a higher ratio, as for req/s)."""
    def r(rps: float, cpu: float, db: float) -> dict[str, float]:
        return {"rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_us": cpu, "db_cpu_us": db}

    table = report.rows({"noop post": [r(1000.0, 300.0, 0.0), r(900.0, 330.0, 0.0)],
                         "proxy first": [r(700.0, 600.0, 200.0), r(600.0, 440.0, 220.0)]})
    by = {row.name: row for row in table}
    first = by["proxy first"]
    assert first.cpu_ratio is not None
    assert first.cpu_ratio.low == 0.5 and first.cpu_ratio.high == 0.75
    assert first.db_cpu_us == 210.0
    assert "| 520 | 0.62 | 210 |" in report.render(table, [])
    assert by["noop post"].cpu_ratio is None  # the baseline itself


def test_cpu_seconds_counts_a_child_that_has_exited() -> None:
    """cpu_seconds sums user and system time over a process and its children, those that
    exited and were reaped too: the CPU a child spun shows in its idle parent's total."""
    import subprocess
    import sys
    import time

    from loadtest.procs import cpu_seconds, tree

    code = ("import subprocess, sys, time; subprocess.run([sys.executable, '-c', "
            "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.5: "
            "pass']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline, seen = time.monotonic() + 30, False
        while time.monotonic() < deadline:  # until the child has run, exited, been reaped
            if len(tree(parent.pid)) > 1:
                seen = True
            elif seen:
                break
            time.sleep(0.05)
        assert seen and len(tree(parent.pid)) == 1
        assert cpu_seconds(parent.pid) >= 0.5
    finally:
        parent.kill()
        parent.wait()


def _scrape(claim: tuple[float, ...], total: float) -> str:
    """A /metrics text with one claim histogram (cumulative counts for le 1, 5, 10 ms, +Inf)
    and an empty upstream one."""
    lines = ["# HELP idemproxy_store_seconds Store round-trip time by operation.",
             "# TYPE idemproxy_store_seconds histogram"]
    for le, c in zip(("0.001", "0.005", "0.01", "+Inf"), claim, strict=True):
        lines.append(f'idemproxy_store_seconds_bucket{{le="{le}",op="claim"}} {c}')
    lines += [f'idemproxy_store_seconds_sum{{op="claim"}} {total}',
              f'idemproxy_store_seconds_count{{op="claim"}} {claim[-1]}',
              'idemproxy_store_seconds_bucket{le="+Inf",op="release"} 7',
              'idemproxy_store_seconds_sum{op="release"} 1.0',
              'idemproxy_store_seconds_count{op="release"} 7']
    return "\n".join(lines) + "\n"


def test_phases_between_two_scrapes() -> None:
    """A phase's mean is its sum over its count between two scrapes, its percentiles are
    interpolated in the buckets of the difference, and other ops are not mixed in."""
    from loadtest import phases

    before = _scrape((10, 10, 10, 10), 0.005)  # 10 fast claims before the run
    after = _scrape((10, 60, 110, 110), 0.005 + 0.6)  # 100 more: 50 in 1-5 ms, 50 in 5-10
    got = phases.during(before, after)
    assert set(got) == {"claim"}
    claim = got["claim"]
    assert claim["n"] == 100
    assert claim["mean_ms"] == pytest.approx(6.0)
    assert claim["p50_ms"] == pytest.approx(5.0)
    assert claim["p99_ms"] == pytest.approx(9.9)
    runs = {"proxy first": [{"rps": 1.0, "p50_ms": 8.0, "phases": got}]}
    assert report.phase_lines(runs) == [
        "idemproxy first requests: claim 6.00 ms (means; whole request p50 8.00 ms)"]


def test_phases_above_the_last_bucket() -> None:
    """Observations past the last finite bucket give that bound, not infinity."""
    from loadtest import phases

    h = phases.Histogram(((0.01, 0.0), (float("inf"), 4.0)), 1.0, 4.0)
    assert h.quantile(0.99) == 0.01
    assert phases.Histogram((), 0.0, 0.0).quantile(0.5) is None


def test_paced_first_requests_at_their_own_rate_compare_with_the_noop_at_that_rate() -> None:
    """The "paced equal" pair: first requests paced at half their own rate are compared
    with the noop paced at that same rate, for the p99 ratio and the p50 difference in
    milliseconds (round by round), beside the same bounds at half the noop's rate."""
    def r(p50: float, p99: float) -> dict[str, float]:
        return {"rps": 400.0, "p50_ms": p50, "p99_ms": p99}

    runs = {"noop post paced": [r(2.0, 10.0), r(2.5, 12.0)],
            "proxy first paced": [r(9.0, 40.0), r(7.0, 30.0)],
            "noop post paced equal": [r(1.5, 8.0), r(1.0, 6.0)],
            "proxy first paced equal": [r(2.0, 10.0), r(2.5, 12.0)]}
    table = report.rows(runs)
    by = {row.name: row for row in table}
    assert report.baseline_of("proxy first paced equal") == "noop post paced equal"
    assert by["proxy first paced equal"].p99_ratio is not None
    assert by["proxy first paced equal"].p99_ratio.median == pytest.approx(1.625)
    checks = {c["target"]: c for c in report.verdicts(table, rss_growth_mib=None, runs=runs)}
    assert checks["first-request p50 at the same load"]["value"] == pytest.approx(5.75)
    assert checks["first-request p50 at the same load"]["met"] is False
    assert checks["first-request p50 at half its own rate"]["value"] == pytest.approx(1.0)
    assert checks["first-request p50 at half its own rate"]["met"] is True
    assert checks["first-request p99 at half its own rate"]["met"] is False
    text = report.render(table, list(checks.values()))
    assert "| first-request p50 at half its own rate | 1.00 ms | <= 1 ms over the " \
           "baseline's p50 | yes |" in text
    assert "idemproxy first requests, paced at half their own rate" in text


def test_stolen_cpu_between_two_readings_of_proc_stat() -> None:
    """host_cpu reads steal and the total from /proc/stat's cpu line; stolen_pct is the
    share stolen between two readings, and the report prints its median and highest."""
    from loadtest.procs import host_cpu, stolen_pct

    before = host_cpu("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3 4\n")
    after = host_cpu("cpu  200 0 100 1500 10 0 10 85 7 0\n")
    assert before == (35, 1000) and after == (85, 1905)  # guest time is in user already
    assert stolen_pct(before, after) == pytest.approx(100 * 50 / 905)
    assert stolen_pct(after, after) is None  # no time passed: no share
    assert host_cpu("intr 1 2\n") == (0, 0)
    assert host_cpu()[1] > 0  # this machine's own /proc/stat
    line = report.steal_line({"noop get": [{"rps": 1.0, "steal_pct": 4.0},
                                           {"rps": 1.0, "steal_pct": 20.0}],
                              "proxy get": [{"rps": 1.0, "steal_pct": 10.0}],
                              "pgbench first": [{"rps": 1.0}]})
    assert line is not None and "median 10.0 %, highest 20.0 %" in line
    assert report.steal_line({"noop get": [{"rps": 1.0}]}) is None
