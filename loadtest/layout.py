"""Where the harness's processes run: `--pin` splits the cores between the load side and
the proxies under test.

Pinned, the load side (wrk, the fake upstream, PostgreSQL, pgbench, the harness itself)
gets the first half of the usable cores and the proxies (idemproxy, the do-nothing
proxy, nginx as a proxy) the rest, so a proxy's rate is not what wrk or the database
left it. Unpinned (the default), everything shares every core, as before. `split` is
pure; `cpus_allowed` reads what the kernel actually applied, for the record.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class PinError(ValueError):
    """`--pin` cannot split these cores (fewer than two usable)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """The two sides of a pinned run, as sorted core numbers."""

    load: tuple[int, ...]
    proxies: tuple[int, ...]

    def describe(self) -> str:
        return (f"pinned: load side (wrk, upstream nginx, PostgreSQL, pgbench, harness) on "
                f"core {cpu_list(self.load)}, proxies on core {cpu_list(self.proxies)}")


def split(cpus: Iterable[int]) -> Layout:
    """Half the usable cores (rounded down, at least one) for the load side, the lowest
    numbered; the rest for the proxies. Two cores: 0 for the load, 1 for the proxies."""
    cores = sorted(set(cpus))
    if len(cores) < 2:
        raise PinError(f"--pin needs at least 2 usable cores to put the load and the "
                       f"proxies apart; this process may use {len(cores)} "
                       f"({cpu_list(cores) or 'none'}). Run without --pin.")
    half = len(cores) // 2
    return Layout(load=tuple(cores[:half]), proxies=tuple(cores[half:]))


def cpu_list(cpus: Iterable[int]) -> str:
    """Cores in the kernel's list format, runs collapsed: [0, 1, 2, 5] → "0-2,5"."""
    cores = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        runs.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(runs)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """The kernel's list format back to cores: "0-2,5" → (0, 1, 2, 5)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(out))


def taskset(cpus: Iterable[int], argv: list[str]) -> list[str]:
    """`argv` started on `cpus` only (util-linux `taskset`, which execs it: same pid)."""
    return ["taskset", "-c", cpu_list(cpus), *argv]


def cpus_allowed(pid: int) -> str | None:
    """`Cpus_allowed_list` of /proc/<pid>/status (what the kernel applied); None if gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return None


def pin_tree(pid: int, cpus: Iterable[int]) -> int:
    """Every thread of `pid` and of its descendants onto `cpus` (what they fork later
    inherits it); returns how many threads were set. Used on the postmaster before any
    proxy connects, so every backend it forks starts there."""
    from loadtest.procs import tree

    n = 0
    for p in tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), set(cpus))
                n += 1
    return n
