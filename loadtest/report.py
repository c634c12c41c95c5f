"""Pure: from the runs of one benchmark to the table, the ratios and the verdicts.

`runs` maps a measurement ("proxy replay", "noop post", …) to one dict per round with at
least `rps`, and `p50_ms`/`p99_ms` for wrk runs. Ratios are the median of round-by-round
ratios against the do-nothing proxy's same-shaped request ("noop get" for GETs, "noop
post" for POSTs, "noop get paced" / "noop post paced" for the paced runs, which offer
both sides the same load: half the noop's saturation rate for that shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest import phases
from loadtest.stats import TARGETS, Summary, paired_ratios, rss_met, summarize

Runs = Mapping[str, Sequence[Mapping[str, Any]]]

ORDER = (
    "upstream get", "upstream post", "nginx get", "nginx post", "noop get", "noop post",
    "proxy get", "proxy pass post", "proxy first", "proxy replay", "proxy replay db",
    "proxy hot",
    "pooler first", "pooler replay", "pooler replay db",
    "sealed first", "sealed replay", "sealed replay db",
    "citus first", "citus replay", "citus replay db",
    "pgbench first", "pgbench first batched",
    "pgbench replay", "noop post paced", "proxy replay paced", "proxy first paced",
    "proxy pass post paced", "noop get paced", "proxy get paced",
    "noop post paced equal", "proxy first paced equal",
)
LABELS = {
    "upstream get": "upstream direct, GET", "upstream post": "upstream direct, POST",
    "nginx get": "nginx proxy_pass, GET", "nginx post": "nginx proxy_pass, POST",
    "noop get": "do-nothing aiohttp proxy, GET", "noop post": "do-nothing aiohttp proxy, POST",
    "proxy get": "idemproxy pass-through (GET)",
    "proxy pass post": "idemproxy pass-through (POST, unrouted)",
    "proxy first": "idemproxy first requests",
    "proxy replay": "idemproxy replays", "proxy hot": "idemproxy hot key",
    "proxy replay db": "idemproxy replays, replay_cache: 0 (from the database)",
    "pooler first": "idemproxy first requests, through PgBouncer (transaction)",
    "pooler replay": "idemproxy replays, through PgBouncer (transaction)",
    "pooler replay db": "idemproxy replays, replay_cache: 0, through PgBouncer (transaction)",
    "sealed first": "idemproxy first requests, sealed (encryption keys set)",
    "sealed replay": "idemproxy replays, sealed (encryption keys set)",
    "sealed replay db": "idemproxy replays, replay_cache: 0, sealed (encryption keys set)",
    "citus first": "idemproxy first requests, Citus coordinator + 2 workers",
    "citus replay": "idemproxy replays, Citus coordinator + 2 workers",
    "citus replay db": "idemproxy replays, replay_cache: 0, Citus coordinator + 2 workers",
    "pgbench first": "pgbench claim+complete (p50: mean)",
    "pgbench first batched": "pgbench claim+complete in batches of 8 (pairs/s; p50: mean "
                             "per batch)",
    "pgbench replay": "pgbench claim, replay (p50: mean)",
    "noop post paced": "do-nothing POST, paced", "proxy replay paced": "idemproxy replays, paced",
    "proxy first paced": "idemproxy first requests, paced",
    "proxy pass post paced": "idemproxy pass-through (POST), paced",
    "noop get paced": "do-nothing GET, paced", "proxy get paced": "idemproxy pass-through "
                                                                 "(GET), paced",
    "noop post paced equal": "do-nothing POST, paced at half idemproxy's first-request rate",
    "proxy first paced equal": "idemproxy first requests, paced at half their own rate",
}


def label(name: str) -> str:
    if name.endswith(" bigtable"):
        return LABELS.get(name.removesuffix(" bigtable"), name) + ", big table"
    return LABELS.get(name, name)


def baseline_of(name: str) -> str:
    if name.endswith(" bigtable"):
        return baseline_of(name.removesuffix(" bigtable")) + " bigtable"
    if name.endswith("paced equal"):
        return "noop post paced equal"
    if name.endswith("paced"):
        return "noop get paced" if name.endswith("get paced") else "noop post paced"
    return "noop get" if name.endswith("get") else "noop post"


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    rps: Summary
    p50_ms: float | None
    p99_ms: float | None
    ratio: Summary | None  # rps against the baseline, round by round
    p99_ratio: Summary | None  # p99 against the baseline's p99, round by round
    p50_ratio: Summary | None = None  # p50 against the baseline's p50, round by round
    cpu_us: float | None = None  # CPU of the target's processes per request (median)
    db_cpu_us: float | None = None  # PostgreSQL's CPU per request (median), when embedded
    # the baseline's CPU per request over this one's, round by round: what the rps ratio
    # would be if each side had a core to itself (higher is better, as for rps)
    cpu_ratio: Summary | None = None
    # this p50 minus the baseline's, in ms, round by round (#19: at most 1 ms over)
    p50_over: Summary | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"label": label(self.name), "rps": self.rps.as_dict(),
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "ratio_vs_noop": self.ratio.as_dict() if self.ratio else None,
                "p99_ratio_vs_noop": self.p99_ratio.as_dict() if self.p99_ratio else None,
                "p50_ratio_vs_noop": self.p50_ratio.as_dict() if self.p50_ratio else None,
                "cpu_us": self.cpu_us, "db_cpu_us": self.db_cpu_us,
                "cpu_ratio_vs_noop": self.cpu_ratio.as_dict() if self.cpu_ratio else None,
                "p50_over_noop_ms": self.p50_over.as_dict() if self.p50_over else None}


def _median_of(runs: Sequence[Mapping[str, Any]], field: str) -> float | None:
    vals = [r[field] for r in runs if r.get(field) is not None]
    return summarize(vals).median if vals else None


def rows(runs: Runs) -> list[Row]:
    out = []
    order = [*ORDER, *(n + " bigtable" for n in ORDER)]
    for name in [n for n in order if n in runs] + sorted(set(runs) - set(order)):
        rs = runs[name]
        base = runs.get(baseline_of(name))
        ratio = p99_ratio = p50_ratio = cpu_ratio = p50_over = None
        if base and name != baseline_of(name):
            n = min(len(rs), len(base))
            ratio = _field_ratio(rs[:n], base[:n], "rps")
            p99_ratio = _field_ratio(rs[:n], base[:n], "p99_ms")
            p50_ratio = _field_ratio(rs[:n], base[:n], "p50_ms")
            cpu_ratio = _field_ratio(base[:n], rs[:n], "cpu_us")  # less CPU: higher
            p50_over = _field_diff(rs[:n], base[:n], "p50_ms")
        # pgbench reports a mean latency only: it goes in the p50 column, marked (mean)
        out.append(Row(name, summarize([r["rps"] for r in rs]),
                       _median_of(rs, "p50_ms") or _median_of(rs, "mean_ms"),
                       _median_of(rs, "p99_ms"), ratio, p99_ratio, p50_ratio,
                       _median_of(rs, "cpu_us"), _median_of(rs, "db_cpu_us"), cpu_ratio,
                       p50_over))
    return out


def _field_ratio(rs: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]],
                 field: str) -> Summary | None:
    """Round-by-round ratios of `field`, if every run of both sides has it."""
    if not all(r.get(field) for r in [*rs, *base]):
        return None
    return _summary(paired_ratios([r[field] for r in rs], [b[field] for b in base]))


def _field_diff(rs: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]],
                field: str) -> Summary | None:
    """Round-by-round differences of `field`, if every run of both sides has it."""
    if not all(r.get(field) for r in [*rs, *base]):
        return None
    return _summary([r[field] - b[field] for r, b in zip(rs, base, strict=True)])


def _summary(values: list[float]) -> Summary | None:
    return summarize(values) if values else None


def verdicts(table: Sequence[Row], *, rss_growth_mib: float | None,
             big_table_rows: int = 0, runs: Runs | None = None) -> list[dict[str, Any]]:
    """Each target of design §8: the measured value, the bound, met or not (None: not run)."""
    by_name = {r.name: r for r in table}
    out: list[dict[str, Any]] = []
    for t in TARGETS:
        value: float | None = None
        if t.metric == "rss_mib":
            value = rss_growth_mib
        elif (row := by_name.get(t.scenario)) is not None:
            s = {"rps": row.ratio, "p50_over_ms": row.p50_over}.get(t.metric, row.p99_ratio)
            value = s.median if s else None
        met = None if value is None else (rss_met(value, t.bound) if t.metric == "rss_mib"
                                          else t.met(value))
        out.append({"target": t.name, "value": None if value is None else round(value, 3),
                    "bound": t.describe(), "met": met})
    for name in ("first", "replay", "replay db"):
        ratio = side_by_side(runs or {}, "pooler " + name, "proxy " + name)
        if ratio is not None:
            out.append({"target": f"{LABELS['pooler ' + name]} vs direct",
                        "value": round(ratio, 3), "bound": ">= 0.85×", "met": ratio >= 0.85})
    for name in ("first", "replay", "replay db"):  # no bound: what sealing costs
        ratio = side_by_side(runs or {}, "sealed " + name, "proxy " + name)
        if ratio is not None:
            out.append({"target": f"{LABELS['sealed ' + name]} vs unsealed",
                        "value": round(ratio, 3), "bound": "measured only", "met": None})
    for name in ("first", "replay", "replay db"):  # no bound: what the extra hop costs
        ratio = side_by_side(runs or {}, "citus " + name, "proxy " + name)
        if ratio is not None:
            out.append({"target": f"{LABELS['citus ' + name]} vs one node",
                        "value": round(ratio, 3), "bound": "measured only", "met": None})
    for name in ("proxy first", "proxy replay", "proxy replay db"):
        slow = big_table_slowdown(by_name, name)
        if slow is not None:
            out.append({"target": f"{LABELS[name]}, slowdown with {big_table_rows:,} "
                                  "more keys",
                        "value": round(slow * 100, 1), "bound": "< 20 %", "met": slow < 0.2})
    return out


def steal_line(runs: Runs) -> str | None:
    """How much CPU the hypervisor gave other machines during the runs (a shared VM's
    noise, /proc/stat's steal): the median and the highest share over all runs."""
    vals = [r["steal_pct"] for rs in runs.values() for r in rs
            if r.get("steal_pct") is not None]
    if not vals:
        return None
    s = summarize(vals)
    return (f"CPU stolen by the hypervisor during the runs: median {s.median:.1f} %, "
            f"highest {s.high:.1f} % (of both cores' time; rates drift with it, CPU per "
            "request much less)")


def side_by_side(runs: Runs, name: str, base: str) -> float | None:
    """`name` against `base` (through PgBouncer against direct, sealed against plain):
    the median of round-by-round ratios of two runs that sit next to each other in
    every round."""
    direct, pooled = runs.get(base), runs.get(name)
    if not (direct and pooled):
        return None
    n = min(len(direct), len(pooled))
    ratios = paired_ratios([r["rps"] for r in pooled[:n]], [d["rps"] for d in direct[:n]])
    return summarize(ratios).median if ratios else None


def big_table_slowdown(by_name: Mapping[str, Row], name: str) -> float | None:
    """1 - (ratio to the noop on the big table) / (ratio on the small table)."""
    before, after = by_name.get(name), by_name.get(name + " bigtable")
    if not (before and after and before.ratio and after.ratio):
        return None
    return 1.0 - after.ratio.median / before.ratio.median


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render(table: Sequence[Row], checks: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table (measurements), then one line per target."""
    lines = ["| measurement | req/s (median) | spread | p50 ms | p99 ms | × do-nothing | "
             "p50 × do-nothing | p99 × do-nothing | CPU µs/req | × do-nothing by CPU | "
             "PostgreSQL CPU µs/req |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        ratio = f"{r.ratio.median:.2f} ({r.ratio.low:.2f}–{r.ratio.high:.2f})" if r.ratio \
            else ("1.00" if r.name == baseline_of(r.name) else "-")
        p99r = f"{r.p99_ratio.median:.2f}" if r.p99_ratio else "-"
        p50r = f"{r.p50_ratio.median:.2f}" if r.p50_ratio else "-"
        cpur = f"{r.cpu_ratio.median:.2f}" if r.cpu_ratio else "-"
        lines.append(f"| {label(r.name)} | {_fmt(r.rps.median, 0)} | "
                     f"±{r.rps.spread_pct / 2:.0f} % | {_fmt(r.p50_ms, 2)} | "
                     f"{_fmt(r.p99_ms, 2)} | {ratio} | {p50r} | {p99r} | "
                     f"{_fmt(r.cpu_us, 0)} | {cpur} | {_fmt(r.db_cpu_us, 0)} |")
    lines += ["", "| target | measured | bound | met |", "|---|---:|---|---|"]
    for c in checks:
        met = {True: "yes", False: "**no**", None: "not run"}[c["met"]] \
            if c["bound"] != "measured only" else "-"
        unit = " MiB" if "MiB" in c["bound"] else " %" if "%" in c["bound"] else \
            " ms" if "ms" in c["bound"] else "×"
        value = "-" if c["value"] is None else f"{c['value']:.2f}{unit}"
        lines.append(f"| {c['target']} | {value} | {c['bound']} | {met} |")
    return "\n".join(lines)


def phase_lines(runs: Runs) -> list[str]:
    """Where first requests' time went (loadtest/phases.py), for each run that has it:
    the median over rounds of each phase's mean, next to the run's own p50."""
    out = []
    for name in [n for n in ORDER if n in runs]:
        means = phases.summary(list(runs[name]))
        if not means:
            continue
        p50 = _median_of(runs[name], "p50_ms")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in means.items())
        out.append(f"{label(name)}: {parts} ms (means; whole request p50 {_fmt(p50, 2)} ms)")
    return out

