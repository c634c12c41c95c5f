"""The history checker: pure functions over what the clients saw and what the upstream did.

A *unit* is (tenant, route, key): one key's scope. Every run uses a TTL far longer than the
run, so each unit has exactly one dedup window. Per unit:

1. At most one execution, except a re-execution the route's policy documents:
   - the previous execution answered a release status (503): the key was released;
   - `unknown_outcome: retry`, the previous execution's answer reached no client, and
     the new one started after the previous claim's lease had surely ended.
   Anything else is a violation (inside the lease, after an answer was delivered, under
   `unknown_outcome: fail`, or with another fingerprint), and so is a re-execution after
   a malformed answer (upstream.MALFORMED: the upstream answered, the proxy must store
   that) unless a fault on its proxy or the store explains that the proxy never could.
2. Every stored answer a client got (a 2xx, or a replayed failure) is identical, and a 2xx
   is byte for byte the response of an execution of *this* unit with *this* fingerprint.
3. A 422 only after some request of the unit carried a different fingerprint.
4. After healing, every unit reaches a definite answer.

A violation carries its minimal witness: the unit's executions and answered attempts.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tests.torture.clients import Attempt
from tests.torture.upstream import MALFORMED

Unit = tuple[str, str, str]
TOLERANCE = 0.05  # seconds of clock reading noise between processes on one machine


@dataclass(frozen=True)
class Execution:
    t: float
    exec: str
    proxy: int
    route: str
    tenant: str
    key: str
    fp: str
    mode: str
    status: int
    body: str

    @property
    def unit(self) -> Unit:
        return (self.tenant, self.route, self.key)

    @classmethod
    def parse(cls, line: str) -> Execution:
        d = json.loads(line)
        return cls(d["t"], d["exec"], int(d["proxy"].removeprefix("p")), d["route"],
                   d["tenant"], d["key"], d["fp"], d["mode"], d["status"], d["body"])


@dataclass(frozen=True)
class FaultEvent:
    t: float
    kind: str
    proxy: int | None  # None: every proxy (Postgres restart, database clock step)
    until: float = 0.0  # when it was undone (latency, partition, armed cut, restart)
    detail: str = ""  # what exactly: the clock step (+57s), the slow readers (2 readers)


@dataclass
class Violation:
    kind: str
    unit: Unit
    detail: str
    witness: list[str] = field(default_factory=list)

    def render(self) -> str:
        head = f"VIOLATION {self.kind}: tenant={self.unit[0]!r} route={self.unit[1]} " \
               f"key={self.unit[2]}\n  {self.detail}"
        return "\n".join([head, *("    " + w for w in self.witness)])


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    reexecutions: list[tuple[Unit, str]] = field(default_factory=list)
    units: int = 0
    executions: int = 0


def check(attempts: Iterable[Attempt], executions: Iterable[Execution], *, lease: float,
          faults: Iterable[FaultEvent] = ()) -> Report:
    by_unit: dict[Unit, list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_unit[a.unit].append(a)
    ex_unit: dict[Unit, list[Execution]] = defaultdict(list)
    ex_id: dict[str, Execution] = {}
    for e in executions:
        ex_unit[e.unit].append(e)
        ex_id[e.exec] = e
    report = Report(units=len(set(by_unit) | set(ex_unit)), executions=len(ex_id))
    fault_list = sorted(faults, key=lambda f: f.t)
    for unit in sorted(set(by_unit) | set(ex_unit)):
        atts = sorted(by_unit.get(unit, []), key=lambda a: a.t0)
        exs = sorted(ex_unit.get(unit, []), key=lambda e: e.t)
        found: list[tuple[str, str]] = []
        found += _check_executions(unit, atts, exs, lease, fault_list, report)
        found += _check_answers(atts, ex_id)
        found += _check_422(atts)
        found += _check_liveness(atts)
        for kind, detail in found:
            report.violations.append(Violation(kind, unit, detail,
                                               witness(atts, exs, fault_list)))
    return report


def _check_executions(unit: Unit, atts: list[Attempt], exs: list[Execution], lease: float,
                      faults: list[FaultEvent], report: Report) -> list[tuple[str, str]]:
    out = []
    delivered = {a.body for a in atts if a.kind == "ok"}
    for prev, nxt in zip(exs, exs[1:], strict=False):
        if prev.status == 503:
            report.reexecutions.append((unit, "released after a 503 (release_statuses)"))
            continue
        where = f"{prev.exec} at {prev.t:.3f} then {nxt.exec} at {nxt.t:.3f}"
        if nxt.fp != prev.fp:
            out.append(("second-execution", f"re-executed with another fingerprint: {where}"))
        elif prev.route == "fail":
            out.append(("second-execution", "re-executed under unknown_outcome: fail "
                        f"({_why(prev, faults)}): {where}"))
        elif prev.body in delivered:
            out.append(("second-execution", "re-executed although the first answer had "
                        f"been delivered to a client ({_why(prev, faults)}): {where}"))
        elif prev.mode in MALFORMED and not _near(prev, faults) - _NOT_EXCUSES:
            out.append(("second-execution", "re-executed although the upstream had "
                        f"answered (malformed: {prev.mode}): {where}"))
        elif nxt.t + TOLERANCE < claim_lower_bound(prev, atts) + lease:
            out.append(("second-execution", f"re-executed inside the first claim's "
                        f"{lease:g}s lease: {where}"))
        else:
            report.reexecutions.append((unit, "unknown_outcome: retry after the lease, "
                                        + _why(prev, faults)))
    return out


def claim_lower_bound(e: Execution, atts: list[Attempt]) -> float:
    """The earliest the claim behind `e` can have been taken: the earliest start of an
    attempt that went to e's proxy with e's fingerprint and had no answer before e ran."""
    starts = [a.t0 for a in atts if a.proxy == e.proxy and a.fp == e.fp and a.t0 <= e.t
              and not (a.status is not None and a.t1 < e.t)]
    return min(starts, default=e.t - 10.0)


_CAUSES = (("kill9", "its proxy was killed (kill -9)"), ("term", "its proxy was stopped (SIGTERM)"),
           ("stall", "its proxy was paused (SIGSTOP)"),
           ("db_clock", "the database clock stepped"),
           ("up_malformed", "the upstream answered malformed"),
           ("up_", "the proxy-upstream link failed"), ("pg_", "the store was unreachable"),
           ("slow_reader", "a client stopped reading"))
# Faults that never excuse a re-execution after a malformed answer: they are the answer
# itself, or happen on the client side.
_NOT_EXCUSES = frozenset({"up_malformed", "slow_reader"})


def _near(e: Execution, faults: list[FaultEvent]) -> set[str]:
    """The kinds of the faults around an execution, on its proxy or on every proxy."""
    return {f.kind for f in faults if f.t <= e.t + 2.0
            and max(f.t, f.until) >= e.t - 1.0 and f.proxy in (None, e.proxy)}


def _why(e: Execution, faults: list[FaultEvent]) -> str:
    """The likeliest reason an execution's outcome stayed unknown: its proxy dying, else
    what the upstream did, else the first of the faults around it (order of _CAUSES)."""
    near = _near(e, faults)
    if e.mode in ("slow", "reset") and not near & {"kill9", "term"}:
        return {"slow": "the upstream answered after the proxy's timeout",
                "reset": "the upstream dropped the connection"}[e.mode]
    if e.mode in MALFORMED and not near - _NOT_EXCUSES:
        return f"the upstream answered malformed ({e.mode})"
    for prefix, cause in _CAUSES:
        if any(k.startswith(prefix) for k in near):
            return cause
    return "no injected fault nearby"


def _check_answers(atts: list[Attempt], ex_id: dict[str, Execution]) -> list[tuple[str, str]]:
    out = []
    stored = [a for a in atts if a.kind == "ok" or (a.kind == "def" and a.replayed)]
    answers = {_stands_for(a, ex_id) for a in stored}
    if len(answers) > 1:
        out.append(("divergent-answers", f"{len(answers)} different stored answers: " +
                    "; ".join(f"{s} {b[:90]}" for s, b in sorted(answers, key=str))))
    for a in atts:
        if a.kind != "ok":
            continue
        exec_ = ex_id.get(a.exec if a.omitted or not a.body else _exec_of(a.body))
        if exec_ is None:
            out.append(("foreign-answer", f"op {a.op}.{a.n} got a 2xx from no execution"))
        elif exec_.unit != a.unit:
            out.append(("foreign-answer", f"op {a.op}.{a.n} got {exec_.exec}, executed for "
                        f"tenant={exec_.tenant!r} route={exec_.route} key={exec_.key}"))
        elif exec_.fp != a.fp:
            out.append(("foreign-answer", f"op {a.op}.{a.n} (body v{a.version}) got "
                        f"{exec_.exec}, executed for another fingerprint"))
        elif (exec_.status, exec_.body) != _stands_for(a, ex_id):
            out.append(("altered-answer", f"op {a.op}.{a.n} got {a.status} {a.body[:80]}"
                        f"{' (body omitted)' if a.omitted else ''} but {exec_.exec} "
                        f"answered {exec_.status} {exec_.body[:80]}"))
    return out


def _stands_for(a: Attempt, ex_id: dict[str, Execution]) -> tuple[int | None, str]:
    """The answer an attempt got. A replay marked `Idempotency-Body: omitted` (the store
    failed while the body was being recorded: documented, docs/operations.md) stands for
    its execution's whole answer when its status and exec id (a replayed header) match."""
    if a.omitted:
        e = ex_id.get(a.exec)
        if e is not None and e.status == a.status and not a.body:
            return (e.status, e.body)
    return (a.status, a.body)


def _check_422(atts: list[Attempt]) -> list[tuple[str, str]]:
    out = []
    for a in atts:
        if a.status == 422 and not any(b.fp != a.fp and b.t0 < a.t1 for b in atts):
            out.append(("bad-422", f"op {a.op}.{a.n} got 422 but no request of this key "
                        "carried another fingerprint"))
    return out


def _check_liveness(atts: list[Attempt]) -> list[tuple[str, str]]:
    final = [a for a in atts if a.phase == "final"]
    if final and not any(a.kind in ("ok", "def") for a in final):
        last = final[-1]
        return [("no-definite-answer", f"after healing, {len(final)} attempts and still "
                 f"{last.status or last.err} {last.ptype}")]
    return []


def witness(atts: list[Attempt], exs: list[Execution], faults: Sequence[FaultEvent] = (),
            limit: int = 40) -> list[str]:
    """The unit's history, time-ordered: executions, attempts, and faults near executions."""
    rows = [(e.t, f"{e.t:.3f} EXEC  {e.exec} via p{e.proxy} mode={e.mode} "
             f"status={e.status} fp={e.fp[:8]}") for e in exs]
    if exs:
        lo, hi = exs[0].t - 3, exs[-1].t + 3
        rows += [(f.t, f"{f.t:.3f} FAULT {f.kind}" + (f" {f.detail}" if f.detail else "") +
                  (f" on p{f.proxy}" if f.proxy is not None else "") +
                  (f" for {f.until - f.t:.1f}s" if f.until > f.t else ""))
                 for f in faults if lo <= f.t <= hi]
    for a in atts:
        what = f"{a.status} {a.ptype}".strip() if a.status else a.err
        extra = " replayed" if a.replayed else ""
        if a.kind == "ok":
            extra += " exec=" + (_exec_of(a.body) if a.body else a.exec)
        rows.append((a.t0, f"{a.t0:.3f}-{a.t1:.3f} {a.phase} op{a.op}.{a.n} p{a.proxy} "
                     f"v{a.version} fp={a.fp[:8]} -> {a.kind} {what}{extra}"))
    rows.sort()
    lines = [r for _, r in rows]
    if len(lines) > limit:
        keep = [ln for ln in lines if " EXEC " in ln or " FAULT " in ln or "-> ok" in ln
                or "-> def" in ln]
        lines = keep[:limit] + [f"... ({len(rows) - len(keep[:limit])} more lines)"]
    return lines


def _exec_of(body: str) -> str:
    try:
        return str(json.loads(body).get("exec", "?"))
    except (ValueError, AttributeError):
        return "?"
