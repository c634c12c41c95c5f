"""`python -m tests.torture` (`make torture`): the long fault-injection run.

    python -m tests.torture [--duration 180] [--seed 1] [--proxies 3] [--workers 12]
                            [--faults kill9,pg_restart,...] [--json FILE] [--keep]

Prints the figures (operations, faults injected by kind, keys re-executed by policy and
why, violations with their minimal witnesses) and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from tests.torture.nemesis import ALL_KINDS
from tests.torture.run import Options, run

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None = None) -> tuple[Options, Path | None]:
    p = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--proxies", type=int, default=3)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--lease", type=float, default=2.0, help="lock_timeout, seconds")
    p.add_argument("--interval", default="1,3", help="seconds between faults: LO,HI")
    p.add_argument("--faults", default=",".join(ALL_KINDS),
                   help=f"comma-separated kinds, or 'none' (default: all of {ALL_KINDS})")
    p.add_argument("--skew", default="+300s", help="faketime offset for proxy 1; '' for none")
    p.add_argument("--proxy0-workers", type=int, default=2,
                   help="worker processes of proxy 0 (under its supervisor)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--findings", type=Path, default=HERE / "findings",
                   help="where a run with violations writes its report")
    a = p.parse_args(argv)
    faults = () if a.faults == "none" else tuple(k for k in a.faults.split(",") if k)
    bad = [k for k in faults if k not in ALL_KINDS]
    if bad:
        p.error(f"unknown fault kinds: {bad}")
    lo, hi = (float(x) for x in a.interval.split(","))
    return Options(duration=a.duration, seed=a.seed, proxies=a.proxies, workers=a.workers,
                   lease=a.lease, interval=(lo, hi), faults=faults, skew=a.skew or None,
                   keep=a.keep, findings=a.findings, proxy0_workers=a.proxy0_workers), a.json


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    opts, json_path = parse(argv)
    summary = asyncio.run(run(opts))
    print(summary.render(), flush=True)
    if json_path is not None:
        json_path.write_text(summary.to_json())
    if opts.keep:
        print(f"work directory kept: {summary.workdir}")
    elif (summary.problems or summary.violations) and opts.findings is not None:
        print(f"logs and summary kept under {opts.findings}")
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
