"""One torture run: start the cluster, run clients and the nemesis, heal, check, report."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.torture.checker import Execution, Report, check
from tests.torture.clients import Clients
from tests.torture.cluster import FAKETIME_LIB, Cluster
from tests.torture.nemesis import ALL_KINDS, Nemesis


@dataclass
class Options:
    duration: float = 180.0
    seed: int = 1
    proxies: int = 3
    workers: int = 12
    lease: float = 2.0
    interval: tuple[float, float] = (1.0, 3.0)
    faults: tuple[str, ...] = ALL_KINDS
    skew: str | None = "+300s"
    proxy0_workers: int = 2  # proxy 0 runs under its supervisor with N worker processes
    upstream_slow: float = 0.01
    upstream_reset: float = 0.01
    upstream_release: float = 0.03
    keep: bool = False
    findings: Path | None = None


@dataclass
class Summary:
    options: Options
    ops: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    executions: Counter[str] = field(default_factory=Counter)
    units: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    cuts: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    reexecutions: Counter[str] = field(default_factory=Counter)
    reexecuted_keys: int = 0
    violations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workdir: str = ""

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "options"}
        d["options"] = {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in self.options.__dict__.items()}
        return json.dumps(d, indent=2, sort_keys=True, default=str)

    def render(self) -> str:
        o = self.options
        skew = f", proxy 1 clock {o.skew} (faketime)" if o.skew and o.proxies > 1 else ""
        skew += f", proxy 0 with {o.proxy0_workers} workers" if o.proxy0_workers > 1 else ""
        a = self.attempts
        lines = [
            f"torture: seed {o.seed}, {o.duration:g}s of faults, {o.proxies} proxies{skew}, "
            f"{o.workers} workers, lease {o.lease:g}s, {self.seconds:.0f}s in all",
            f"operations: {self.ops} logical operations, {sum(a.values())} HTTP attempts "
            f"({_fmt(a)})",
            f"executions: {sum(self.executions.values())} upstream executions over "
            f"{self.units} keys (by upstream mode: {_fmt(self.executions)})",
            f"faults injected: {sum(self.faults.values())} ({_fmt(self.faults)}); proxy "
            f"restarts {self.restarts}; answers cut after commit: {_fmt(self.cuts) or 'none'}",
            f"keys re-executed by policy: {self.reexecuted_keys} "
            f"({_fmt(self.reexecutions) or 'none'})",
            f"violations: {len(self.violations)}",
        ]
        lines += self.violations
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _fmt(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


async def run(opts: Options) -> Summary:
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="idemproxy-torture-"))
    summary = Summary(opts, workdir=str(root))
    cluster = Cluster(root)
    completed = False
    skew = opts.skew if opts.skew and FAKETIME_LIB is not None else None
    if opts.skew and not skew:
        summary.problems.append("faketime not installed: no clock skew this run")
    kinds = opts.faults
    if "db_clock" in kinds and FAKETIME_LIB is None:
        summary.problems.append("faketime not installed: no database clock steps this run")
        kinds = tuple(k for k in kinds if k != "db_clock")
    try:
        await cluster.start(n_proxies=opts.proxies, lease=f"{opts.lease:g}s", seed=opts.seed,
                            skew=skew, workers_first=opts.proxy0_workers, upstream_args=[
                                "--slow", str(opts.upstream_slow), "--reset",
                                str(opts.upstream_reset), "--release",
                                str(opts.upstream_release)], db_clock="db_clock" in kinds)
        if skew:
            summary.faults["clock_skew"] = 1
        clients = Clients([p.url for p in cluster.proxies], seed=opts.seed)
        nemesis = Nemesis(cluster, seed=opts.seed + 7, kinds=kinds, interval=opts.interval,
                          clients=clients)
        until = time.monotonic() + opts.duration
        await asyncio.gather(clients.run(workers=opts.workers, until=until),
                             nemesis.run(until=until))
        summary.problems += await nemesis.heal()
        await asyncio.sleep(opts.lease + 0.5)  # every lease taken before healing has ended
        await final_phase(clients, lease=opts.lease)
        await asyncio.sleep(0.5)
        assert cluster.executions_log is not None
        executions = [Execution.parse(ln) for ln in
                      cluster.executions_log.read_text().splitlines() if ln.strip()]
        report = check(clients.history, executions, lease=opts.lease,
                       faults=nemesis.events)
        _fill(summary, clients, executions, nemesis, report)
        (root / "history.jsonl").write_text("".join(a.line() + "\n"
                                                    for a in clients.history))
        (root / "faults.jsonl").write_text("".join(json.dumps(f.__dict__) + "\n"
                                                   for f in nemesis.events))
        completed = True
    finally:
        await cluster.close()
        summary.restarts = sum(p.restarts for p in cluster.proxies)
        summary.seconds = time.monotonic() - started
        failed = not completed or bool(summary.violations or summary.problems)
        if failed and opts.findings is not None:
            _keep_findings(summary, root, opts.findings)
        if not opts.keep:  # a failed run cleans up too: its logs went to findings
            shutil.rmtree(root, ignore_errors=True)
    return summary


def _keep_findings(summary: Summary, root: Path, findings: Path) -> None:
    """The summary and the small artefacts (logs, histories, configs); never the pgdata."""
    name = f"seed{summary.options.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    findings.mkdir(parents=True, exist_ok=True)
    (findings / f"{name}.txt").write_text(summary.render() + "\n")
    logs = findings / f"{name}-logs"
    logs.mkdir(exist_ok=True)
    for f in root.iterdir():
        if f.is_file() and f.suffix in (".log", ".jsonl", ".yaml"):
            shutil.copy2(f, logs / f.name)


async def final_phase(clients: Clients, *, lease: float) -> None:
    """Every key seen, once more with its canonical body, until a definite answer."""
    units = sorted({a.unit for a in clients.history})
    rng = random.Random(0)
    sem = asyncio.Semaphore(8)
    deadline = time.monotonic() + max(30.0, 3 * lease + 20)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def one(tenant: str, route: str, key: str) -> None:
            async with sem:
                await clients.operation(session, rng, tenant=tenant, route=route, key=key,
                                        version=1, phase="final", deadline=deadline,
                                        max_attempts=40)
        await asyncio.gather(*(one(*u) for u in units))


def _fill(s: Summary, clients: Clients, executions: list[Execution], nemesis: Nemesis,
          report: Report) -> None:
    s.ops = clients.ops
    for a in clients.history:
        label = a.kind if a.kind != "indet" else \
            f"indeterminate {a.err or a.status}"
        if a.kind == "def":
            label = f"definite {a.status}{' replayed' if a.replayed else ''}"
        s.attempts[label] += 1
    s.executions.update(e.mode for e in executions)
    s.units = report.units
    s.faults.update(nemesis.counts)
    s.cuts.update(nemesis.cuts())
    s.reexecutions.update(reason for _, reason in report.reexecutions)
    s.reexecuted_keys = len({u for u, _ in report.reexecutions})
    s.violations = [v.render() for v in report.violations]
