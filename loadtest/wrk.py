"""Drive a target with wrk and a Lua scenario; parse what it prints."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtest.configs import AUTHORIZATION, BODY

LUA = Path(__file__).resolve().parent / "lua"
MARK = "WRK_JSON "


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles (ms) and error counts."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    errors: int  # socket errors and timeouts
    non_2xx: int  # answers outside 2xx/3xx

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__slots__}


def script_text(scenario: str) -> str:
    """The Lua wrk runs: the shared part (summary, request builder) plus the scenario."""
    common = (LUA / "common.lua").read_text()
    common = common.replace("__AUTH__", AUTHORIZATION).replace("__BODY__", BODY)
    return common + "\n" + (LUA / f"{scenario}.lua").read_text()


def parse(output: str) -> WrkResult:
    """wrk's output → WrkResult, from the line our `done()` prints."""
    for line in output.splitlines():
        if line.startswith(MARK):
            d = json.loads(line[len(MARK):])
            seconds = d["duration_us"] / 1e6
            return WrkResult(
                requests=d["requests"], seconds=seconds,
                rps=d["requests"] / seconds if seconds else 0.0,
                p50_ms=d["p50"] / 1000, p90_ms=d["p90"] / 1000, p99_ms=d["p99"] / 1000,
                p999_ms=d["p999"] / 1000, mean_ms=d["mean"] / 1000,
                errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
                non_2xx=d["status"])
    raise ValueError(f"no {MARK.strip()} line in wrk output:\n{output[-2000:]}")


def run(*, url: str, scenario: str, workdir: Path, seconds: float, connections: int,
        threads: int = 1, args: tuple[str, ...] = ()) -> WrkResult:
    script = workdir / f"{scenario}.lua"
    if not script.exists():
        script.write_text(script_text(scenario))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(script), url]
    if args:
        argv += ["--", *args]
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse(proc.stdout)
