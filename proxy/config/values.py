"""Scalar parsers and a reader that collects `field.path: message` problems."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from proxy.config.schema import Listen

T = TypeVar("T")

# --- scalar parsers: each returns a value or raises ValueError with the "is not ..." text ---

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")  # 30s, 1.5h, 1h30m
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# The longest duration any field accepts: 5 years. A key's window ends at the database's
# now() + ttl, read back as a Python datetime (year 9999 at most) and computed in
# PostgreSQL (`make_interval`, timestamps to year 294276): `ttl: 3000000d` passed and then
# every request on its route got a 503 (issue 25). No timeout, lease or window needs more.
MAX_DURATION = 1825 * 86400.0
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (header names)


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `30s`, `15m`, `24h`, `7d` or a sum like `1h30m`; `0` is zero.
    At most MAX_DURATION (5 years)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{value!r} is not a duration like 30s, 15m, 24h, 7d")
    text = "".join(str(value).split())  # `1h 30m` and `30 s` read as written
    if text == "0":
        return 0.0
    if not _DURATION.match(text):
        raise ValueError(f"{value!r} is not a duration like 30s, 15m, 24h, 7d")
    seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if not seconds <= MAX_DURATION:  # `not <=`: an overflow to inf is refused too
        raise ValueError(f"{value!r} is longer than {format_duration(MAX_DURATION)} "
                         "(5 years), the longest duration accepted")
    return seconds


def format_duration(seconds: float) -> str:
    """The largest whole unit: 86400 -> 1d, 5400 -> 90m, 0.5 -> 500ms (for messages)."""
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


def parse_size(value: object) -> int:
    """Bytes from a plain number or `512KiB`, `10MiB`, `1GiB` (KB/MB/GB are powers of 10)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{value!r} is not a size like 512KiB, 10MiB, 1GiB")
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size like 512KiB, 10MiB, 1GiB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_listen(value: object) -> Listen:
    text = str(value) if isinstance(value, (str, int)) else ""
    m = re.match(r"^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d{1,5})$", text)
    if not m or not 0 <= int(m.group(3)) <= 65535:
        raise ValueError(f"{value!r} is not an address like 0.0.0.0:8080 or [::1]:8080")
    host = m.group(1) or m.group(2) or "0.0.0.0"
    return Listen(host, int(m.group(3)))


def parse_header_name(value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset `${VAR}` without default is an error."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set (use ${{{name}:-default}})")

    return _ENV.sub(sub, text)


def field_path(path: str, name: object) -> str:
    """`path.name`; a name that is empty or not a plain word is quoted: `path[''].`"""
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return f"{path}.{name}" if path else name
    return f"{path}[{name!r}]" if path else f"[{name!r}]"


class Reader:
    """Walks a YAML mapping, collecting `path: message` problems instead of stopping."""

    def __init__(self, problems: list[str], env: Mapping[str, str]) -> None:
        self.problems = problems
        self.env = env
        self.unexpanded: set[str] = set()  # paths whose ${VAR} failed: reported already

    def report(self, problem: str) -> None:
        """Add a problem once (a bad `defaults` field is met again by every route)."""
        if problem not in self.problems:
            self.problems.append(problem)

    def section(self, raw: object, path: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.report(f"{path or 'config'}: expected a mapping, got {raw!r}")
            return {}
        for k in raw:
            if k not in allowed:
                self.report(f"{field_path(path, k)}: unknown field (expected one of: "
                            f"{', '.join(sorted(allowed))})")
        return {k: self.expand(v, field_path(path, k)) for k, v in raw.items()}

    def expand(self, value: object, path: str) -> object:
        """`${VAR}` in a string, or in each string of a list (`methods: [${M}]`)."""
        if isinstance(value, list):
            return [self.expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            try:
                return expand_env(value, self.env)
            except ValueError as exc:
                self.report(f"{path}: {exc}")
                self.unexpanded.add(path.rsplit("[", 1)[0] if path.endswith("]") else path)
        return value

    def get(self, data: dict[str, Any], name: str, path: str,
            parse: Callable[[object], T], default: T) -> T:
        if name not in data or data[name] is None and default is None or \
                path in self.unexpanded:
            return default
        try:
            return parse(data[name])
        except ValueError as exc:
            self.report(f"{path}: {exc}")
            return default


def enum_(cls: type[enum.Enum]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of: "
                             f"{', '.join(str(m.value) for m in cls)}") from None
    return parse


def bool_(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def int_in(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{value!r} is not a whole number from {lo} to {hi}")
        return value
    return parse


def str_(value: object) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a string")
    return str(value)


def choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of: {', '.join(options)}")
        return str(value)
    return parse


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`10.0.0.0/8`, `192.168.1.7` or `fd00::/8` (host bits set are allowed and dropped)."""
    return ipaddress.ip_network(text.strip(), strict=False)
