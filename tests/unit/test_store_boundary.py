"""The store is the only module that knows the schema: outside `supervisor/store/` no code runs
a named query, opens a raw transaction, or even names a query. Read from the source's syntax
tree, so a comment or a docstring that mentions a query does not count, and a call does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from supervisor.store.queries import load_queries

PACKAGE = Path(__file__).resolve().parents[2] / "supervisor"
STORE = PACKAGE / "store"
# The primitives an aggregate's operation is made of, private to the store package.
RAW = {"fetchrow", "fetchval", "fetchall", "execute", "transaction", "_fetchrow", "_fetchall",
       "_transaction"}  # fmt: skip
QUERY_NAMES = frozenset(load_queries("sqlite")) | frozenset(load_queries("postgres"))


def _outside_store() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if STORE not in p.parents)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def violations(source: str) -> list[str]:
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            # `conn.execute(...)` of the sqlite3 module would be the same breach, by another name
            if node.func.attr in RAW:
                found.append((node.lineno, f"line {node.lineno}: .{node.func.attr}(...)"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in QUERY_NAMES
            and id(node) not in docs
        ):
            found.append((node.lineno, f"line {node.lineno}: query name {node.value!r}"))
    return [text for _line, text in sorted(found)]


def test_the_checker_sees_a_raw_read_a_raw_transaction_and_a_query_name() -> None:
    source = (
        "async def f(store):\n"
        '    """get_action in a docstring is prose."""\n'
        '    await store.fetchrow("get_action", 1)\n'
        "    async with store.transaction() as tx:\n"
        "        pass\n"
        '    name = "kill_switches"\n'
        "    await store.get_action(1)\n"
    )
    assert violations(source) == [
        "line 3: .fetchrow(...)",
        "line 3: query name 'get_action'",
        "line 4: .transaction(...)",
        "line 6: query name 'kill_switches'",
    ]


@pytest.mark.parametrize("path", _outside_store(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_the_store_knows_the_schema(path: Path) -> None:
    assert violations(path.read_text()) == [], (
        f"{path.relative_to(PACKAGE.parent)} reaches past the store's operations"
    )


def test_the_raw_primitives_are_private_to_the_store() -> None:
    from supervisor.store import Store

    public = {name for name in RAW if not name.startswith("_")}
    assert not public & set(dir(Store)), "Store still offers a raw primitive publicly"
