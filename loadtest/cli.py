"""`python -m loadtest`: start everything, measure in interleaved rounds, report, stop all.

Rounds interleave the targets (do-nothing proxy, idemproxy, nginx, upstream, pgbench) so
that each ratio compares runs seconds apart, not minutes: the machine is shared and its
speed drifts. Round 0 starts with a short warm-up of each measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import clients, layout, report, tools
from loadtest.bench import (
    BIG_TABLE_PLAN,
    CITUS_PLAN,
    POOLER_PLAN,
    RESULTS,
    ROOT,
    SEALED_PLAN,
    Bench,
    Options,
)
from loadtest.procs import Procs, owned


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test (~1 min)")
    p.add_argument("--runs", type=int, help="measured rounds (default 5; quick 1)")
    p.add_argument("--seconds", type=float, help="length of each run (default 4; quick 2)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--hot-connections", type=int, default=200)
    p.add_argument("--no-bigbody", action="store_true", help="skip the 100 MiB scenario")
    p.add_argument("--profile", action="store_true",
                   help="also sample the proxy with py-spy under first requests and replays")
    p.add_argument("--big-table", nargs="?", const=10_000_000, type=int, default=0,
                   metavar="ROWS", help="instead of the full plan: first requests and "
                   "replays (next to the noop) before and after adding ROWS keys to the "
                   "table (default 10 million; several minutes)")
    p.add_argument("--workers", default="1", help="idemproxy `workers:` (a number or "
                   "auto), and as many do-nothing proxy processes (default 1)")
    p.add_argument("--sealed", action="store_true", help="instead of the full plan: first "
                   "requests and replays with stored answers sealed (encryption keys set; "
                   "its own database in the same server) next to the same proxy without")
    p.add_argument("--citus", action="store_true", help="instead of the full plan: first "
                   "requests and replays on a Citus coordinator + 2 workers (sharding: "
                   "citus; needs `make citus`) next to the same proxy on one node")
    p.add_argument("--pooler", action="store_true", help="instead of the full plan: first "
                   "requests and replays through PgBouncer (transaction mode) next to the "
                   "same proxy on a direct connection")
    p.add_argument("--pin", action="store_true", help="wrk, the fake upstream (nginx "
                   "`return` instead of aiohttp), PostgreSQL and pgbench on the first half "
                   "of the cores, the proxies under test on the rest (2 cores: 0 and 1); "
                   "needs 2 cores or more")
    a = p.parse_args(argv)
    quick = a.quick
    if a.pin:
        try:
            proxy_cores = len(layout.split(os.sched_getaffinity(0)).proxies)
        except layout.PinError as exc:
            p.error(str(exc))
    else:
        proxy_cores = os.cpu_count() or 1
    return Options(
        runs=a.runs or (1 if quick else 5), seconds=a.seconds or (2.0 if quick else 4.0),
        warmup=1.0 if quick else 2.0, connections=a.connections,
        hot_connections=a.hot_connections, keys=200 if quick else 2000,
        bigbody=not a.no_bigbody, profile=a.profile, big_table=a.big_table,
        workers=proxy_cores if a.workers == "auto" else int(a.workers),
        pooler=a.pooler, pin=a.pin, sealed=a.sealed, citus=a.citus)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "commit": commit,
            "loadavg": os.getloadavg()}


def run(opts: Options, *, tmp: Path, procs: Procs, db_url: str,
        cores: layout.Layout | None = None, postmaster: int | None = None) -> dict[str, Any]:
    bench = Bench(opts, tmp, procs, db_url, layout=cores, postmaster=postmaster)
    try:
        return _run(opts, bench)
    finally:
        bench.stop_pooler()


def _run(opts: Options, bench: Bench) -> dict[str, Any]:
    bench.start_all()
    print(f"started: {', '.join(f'{k} {v}' for k, v in bench.urls.items())}", flush=True)
    doc: dict[str, Any] = {}
    # Each of these is its own question, a narrow plan instead of the full one:
    # --big-table (before and after adding keys), --sealed (sealed records against plain
    # ones), --pooler (through PgBouncer against direct).
    own = (BIG_TABLE_PLAN if opts.big_table else SEALED_PLAN if opts.sealed
           else POOLER_PLAN if opts.pooler else CITUS_PLAN if opts.citus else None)
    if own is not None:
        bench.prefill()
        doc["layout"] = _layout(bench)
        plan = dict(bench.plan())
        bench.rounds([(k, plan[k]) for k in own])
        if opts.big_table:
            bench.big_table()
        doc["runs"] = bench.runs
        return doc
    if opts.bigbody:  # first, on a fresh process: earlier load would hide the growth
        doc["bigbody"] = bench.bigbody()
    bench.prefill()
    doc["layout"] = _layout(bench)
    bench.rounds(bench.plan())
    bench.rounds(bench.paced_plan())
    doc["paced_rate"] = round(bench.paced_rate, 1)
    doc["paced_rate_get"] = round(bench.paced_rate_get, 1)
    doc["paced_rate_first"] = round(bench.paced_rate_first, 1)
    doc["outcomes"] = clients.outcomes(bench.urls["proxy admin"])
    if opts.profile:
        doc["profile"] = bench.profiles()
    doc["runs"] = bench.runs
    return doc


def _layout(bench: Bench) -> dict[str, Any]:
    """Recorded (and printed) once the proxies hold their database connections."""
    doc = bench.layout_record()
    print(f"layout: {describe(doc)}", flush=True)
    return doc


def describe(doc: dict[str, Any]) -> str:
    """One line for the printed summary: the layout and the cores the kernel applied."""
    if not doc.get("pinned"):
        return f"unpinned (every process on any core), upstream {doc.get('upstream')}"
    pg = doc.get("postgres")
    pg_text = (f"postmaster {pg['postmaster']}, backends "
               + ", ".join(f"{n} on {c}" for c, n in pg["backends"].items())
               if isinstance(pg, dict) else str(pg))
    procs = ", ".join(f"{k} {'/'.join(v)}" for k, v in doc.get("processes", {}).items())
    return (f"pinned: load side on core {doc['load']} (wrk, pgbench, harness "
            f"{doc.get('harness')}; PostgreSQL: {pg_text}), proxies on core "
            f"{doc['proxies']}; upstream {doc.get('upstream')}; cores applied: {procs}")


def postmaster_pid(tmp: Path) -> int | None:
    """The embedded server's postmaster (first line of postmaster.pid); None if external."""
    pidfile = tmp / "pg" / "pgdata" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pidfile.read_text().split()[0])
    return None


@contextlib.contextmanager
def database(tmp: Path) -> Any:
    """IDEMPROXY_DATABASE_URL if set, else an embedded PostgreSQL under `tmp`."""
    url = os.environ.get("IDEMPROXY_DATABASE_URL")
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT))
    from proxy.embedded import embedded_postgres

    with embedded_postgres(tmp / "pg") as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    tools.ensure()
    started = time.time()
    cores = layout.split(os.sched_getaffinity(0)) if opts.pin else None
    if cores is not None:  # the harness first: all it starts inherits the load side
        os.sched_setaffinity(0, cores.load)
        print(cores.describe(), flush=True)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idemproxy-bench-")))
        tmp.chmod(0o755)  # the embedded server and nginx's worker run unprivileged
        db_url = stack.enter_context(database(tmp))
        postmaster = postmaster_pid(tmp)
        if cores is not None and postmaster is not None:  # started under it; made sure
            layout.pin_tree(postmaster, cores.load)
        procs = stack.enter_context(owned(Procs(tmp)))
        doc = run(opts, tmp=tmp, procs=procs, db_url=db_url, cores=cores,
                  postmaster=postmaster)
    table = report.rows(doc["runs"])
    checks = report.verdicts(table, rss_growth_mib=doc.get("bigbody", {}).get(
        "rss_growth_mib"), big_table_rows=opts.big_table, runs=doc["runs"])
    text = report.render(table, checks)
    doc = {"machine": machine(), "options": vars_of(opts), "started": started,
           "elapsed_s": round(time.time() - started, 1),
           "table": {r.name: r.as_dict() for r in table}, "targets": checks, **doc}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(doc, indent=2, default=str))
    print()
    print(text)
    lines = report.phase_lines(doc["runs"])
    if lines:
        print("\nwhere first requests waited (claim, upstream, completion; the proxy's "
              "histograms):")
        for line in lines:
            print("  " + line)
    steal = report.steal_line(doc["runs"])
    if steal:
        print("\n" + steal)
    for prof in doc.get("profile", {}).values():
        if "error" in prof:
            print(f"\nprofile, {prof['label']}: py-spy failed: {prof['error']}")
            continue
        print(f"\nprofile, {prof['label']} ({prof.get('samples', 0)} samples, "
              f"{prof.get('rps', 0):,.0f} req/s under py-spy), self time:")
        for fn, pct in prof.get("self", [])[:10]:
            print(f"  {pct:5.1f} %  {fn}")
    m = doc["machine"]
    if "layout" in doc:
        print(f"\nlayout: {describe(doc['layout'])}")
    print(f"\n{m['nproc']} × {m['cpu']}, commit {m['commit']}, "
          f"{doc['elapsed_s']:.0f}s; JSON: {out.relative_to(ROOT)}")
    return 0


def vars_of(opts: Options) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in opts.__slots__}
