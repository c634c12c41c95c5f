"""Conventions the suite keeps about itself (the team style guide, habit 8): every test
states in a docstring the behaviour it checks."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def undocumented_tests() -> list[str]:
    """`path:line name` of every test function (sync or async, methods too) under tests/
    whose body does not begin with a docstring."""
    missing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name.startswith("test_")
                    and not (ast.get_docstring(node) or "").strip()):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return missing


def test_every_test_has_a_docstring():
    """Every test_* function under tests/ has a non-empty docstring of what it checks."""
    assert undocumented_tests() == []


def test_the_check_sees_async_tests_and_methods(tmp_path, monkeypatch):
    """The walk flags an undocumented async test and test method, and passes documented ones."""
    import tests.test_conventions as me
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        'async def test_a():\n    pass\n\n'
        'class TestB:\n    def test_b(self):\n        x = 1\n\n'
        'def test_c():\n    """Documented."""\n\n'
        'def helper():\n    pass\n')
    monkeypatch.setattr(me, "ROOT", tmp_path)
    assert undocumented_tests() == ["tests/test_x.py:1 test_a", "tests/test_x.py:5 test_b"]
