"""The code's shape (docs/architecture.md): imports point one way, with no
cycle between proxy's modules even through imports inside functions, and asyncpg is
imported only under proxy/store/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The proxy module an imported name lives in (a module, else its package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every proxy module `module` imports, at the top, in a function or for typing."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "proxy":
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def _graph() -> dict[str, set[str]]:
    # A package's __init__ runs before its submodules: an edge from a submodule to its
    # own package is that order, not a cycle to report.
    return {m: {t for t in imports_of(m) if not m.startswith(t + ".")} for m in MODULES}


def test_no_import_cycles_even_through_lazy_imports():
    """No chain of imports (top-level, in functions, or under TYPE_CHECKING) between
    proxy's modules leads back to where it started."""
    assert find_cycle(_graph()) is None, " -> ".join(find_cycle(_graph()) or [])


def test_cycle_finder_finds_a_cycle():
    """The checker itself reports a cycle when there is one (a -> b -> a)."""
    assert find_cycle({"a": {"b"}, "b": {"a"}, "c": set()}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_flow_modules_do_not_import_the_postgres_store():
    """The flow is typed against the Store protocol: only the wiring names Postgres."""
    flow = ["proxy.flow.idempotency", "proxy.flow.execute", "proxy.flow.replay",
            "proxy.flow.recorder", "proxy.flow.relay", "proxy.flow.context",
            "proxy.flow.cache", "proxy.app", "proxy.flow.decide"]
    for module in flow:
        if module in MODULES:
            assert "proxy.store.postgres" not in imports_of(module), module


def _third_party(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    return {name.split(".")[0] for name in names}


def test_asyncpg_only_under_store():
    """asyncpg has one owning package, proxy/store/."""
    for module in MODULES:
        if not module.startswith("proxy.store"):
            assert "asyncpg" not in _third_party(module), module


def test_prometheus_client_only_in_metrics():
    """prometheus_client has one owning module, proxy/metrics.py; everything else reports
    to an observer (proxy/observe.py) or asks metrics.py."""
    for module in MODULES:
        if module != "proxy.metrics":
            assert "prometheus_client" not in _third_party(module), module


def test_only_the_store_package_names_the_postgres_store():
    """Outside proxy/store/ nothing imports or names PostgresStore: the backend is chosen
    in store/open.py, and everything else is typed against the store's protocols."""
    for module, path in MODULES.items():
        if not module.startswith("proxy.store"):
            assert "proxy.store.postgres" not in imports_of(module), module
            assert "PostgresStore" not in path.read_text(), module


def test_store_protocols_name_no_driver_type_and_no_any():
    """The store's protocols (flow, admin, runtime) use neither `Any` nor a driver type."""
    tree = ast.parse(MODULES["proxy.store"].read_text())
    protocols = [n for n in tree.body if isinstance(n, ast.ClassDef)
                 and any(ast.unparse(b).endswith("Protocol") for b in n.bases)]
    assert {"FlowStore", "AdminStore", "RuntimeStore"} <= {p.name for p in protocols}
    for proto in protocols:
        names = {n.id for n in ast.walk(proto) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(proto) if isinstance(n, ast.Attribute)}
        assert not names & {"Any", "asyncpg", "Connection", "Pool"}, proto.name


def test_process_background_tasks_belong_to_the_runtimes_task_group():
    """serve, the workers and the supervisor start their background tasks only in
    runtime.py's one TaskGroup (`group.create_task`), never as loose tasks."""
    for module in ("proxy.runtime", "proxy.server", "proxy.supervisor"):
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("create_task", "ensure_future"):
                assert ast.unparse(node.func.value) == "group", (module, ast.unparse(node))


# The layers, lowest first: a package imports only from layers below it (and from the
# shared leaves at proxy/'s top: errors, paths, sizes, slots, sealing, logs, observe).
LOWER_PACKAGES_ONLY = {
    "proxy.config": {"proxy.flow", "proxy.http", "proxy.keys", "proxy.store"},
    "proxy.keys": {"proxy.flow", "proxy.http", "proxy.upstream", "proxy.store"},
    "proxy.http": {"proxy.flow", "proxy.upstream", "proxy.keys", "proxy.store"},
    "proxy.store": {"proxy.flow", "proxy.http", "proxy.upstream", "proxy.keys"},
    "proxy.upstream": {"proxy.flow", "proxy.keys", "proxy.store"},
}


def test_packages_import_only_downwards():
    """config, keys, http, upstream and store import nothing from the packages above them
    (the flow above all): imports point one way (docs/architecture.md)."""
    for module in MODULES:
        for package, above in LOWER_PACKAGES_ONLY.items():
            if module == package or module.startswith(package + "."):
                bad = {t for t in imports_of(module)
                       if any(t == p or t.startswith(p + ".") for p in above)}
                assert not bad, (module, sorted(bad))


# Over ~300 lines, a module is two concepts (style.md); these are the known exceptions.
LONG_MODULES = {
    "proxy.errors": "the one error tree, drawn in its docstring (httpx keeps one too)",
    "proxy.store.postgres": "open: split once #25 and #29's store work has landed",
}


def test_modules_stay_under_300_lines():
    """No module in proxy/ is over 300 lines, but for the exceptions named above."""
    long = {m for m, p in MODULES.items() if len(p.read_text().splitlines()) > 300}
    assert long <= set(LONG_MODULES), sorted(long - set(LONG_MODULES))
