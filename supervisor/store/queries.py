"""Loads named queries from .sql files: `-- name: x` headers, shared file first, dialect overrides."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(
            line for line in body.strip().splitlines() if not line.lstrip().startswith("--")
        ).strip()
        queries[name] = sql.rstrip(";")
    return queries


def _numbered(sql: str) -> str:
    """Rewrite `?` placeholders to `$1, $2, ...` (the SQL here never holds a literal '?')."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)


def load_queries(dialect: str) -> dict[str, str]:
    root = resources.files("supervisor.store") / "sql"
    queries = _parse((root / "queries.sql").read_text(encoding="utf-8"))
    override = root / dialect / "queries.sql"
    if override.is_file():
        queries.update(_parse(override.read_text(encoding="utf-8")))
    if dialect == "postgres":
        queries = {name: _numbered(sql) for name, sql in queries.items()}
    return queries


def _statements(text: str) -> list[str]:
    """Split on `;`, except inside a `$$`-quoted body (a Postgres function's)."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for part in re.split(r"(\$\$|;)", text):
        if part == "$$":
            quoted = not quoted
        if part == ";" and not quoted:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(part)
    out.append("".join(current).strip())
    return [s for s in out if s]


def load_migrations(dialect: str) -> list[tuple[int, str, list[str]]]:
    """Numbered migrations as (version, file name, statements), in order."""
    folder = resources.files("supervisor.store") / "sql" / dialect
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            text = entry.read_text(encoding="utf-8")
            lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
            statements = _statements("\n".join(lines))
            found.append((int(match.group(1)), entry.name, statements))
    return sorted(found)
