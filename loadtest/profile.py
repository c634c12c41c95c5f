"""Sample the running proxy with py-spy while wrk loads it; summarize the hot functions.

py-spy is installed into the harness's environment on first use (pip). The raw output is
collapsed stacks ("frame;frame;… count"), which any flame-graph tool reads; `top_costs`
turns it into self and inclusive shares per function, of the samples where the proxy was
busy (py-spy leaves out a thread waiting in epoll).

py-spy pauses the proxy for each sample (not `--nonblocking`): that costs it ~10 % of its
rate at 250 Hz, but without the pause over half the stacks came back torn (no root,
measured on the do-nothing proxy: 46 % whole against 100 % paused), which made the
inclusive shares meaningless. The self time of the frame `Runner.run (asyncio/runners.py)`
is uvloop's own C code (the event loop, socket reads and writes, callbacks' C side):
py-spy sees no native frames.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists() and shutil.which("py-spy") is None:
        print("installing py-spy (pip)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"],
                       check=True)
    return str(exe) if exe.exists() else (shutil.which("py-spy") or "py-spy")


def start(*, pid: int, out: Path, seconds: float, rate: int = 250) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--subprocesses",
         "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _function(frame: str) -> str:
    """`name (path:line)` → `name (path)`, with the path shortened to the package."""
    frame = _LINE.sub(")", frame.strip())
    for marker in ("site-packages/", "/lib/python3"):
        if marker in frame:
            name, _, path = frame.partition(" (")
            path = path.split(marker, 1)[1]
            if marker != "site-packages/":
                path = "stdlib" + path[path.find("/"):]
            return f"{name} ({path}"
    return frame.replace(str(Path.cwd()) + "/", "")


def top_costs(collapsed: str, *, limit: int = 15) -> dict[str, object]:
    """Self and inclusive sample shares per function from py-spy's raw output.

    The inclusive list leaves out the frames on (nearly, 98 %) every stack: the entry
    point down to the event loop's `run`, which say nothing about where the time goes.
    """
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # `--subprocesses` roots each stack at a "process N:cmdline" frame: not a function
        frames = [_function(f) for f in stack.split(";")
                  if f.strip() and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100.0 * n / total, 1)) for f, n in c.most_common(limit)]

    telling = Counter({f: n for f, n in incl.items() if n < 0.98 * total})
    return {"samples": total, "self": share(own), "inclusive": share(telling)}
