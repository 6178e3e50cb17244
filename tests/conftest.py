"""Shared fixtures: the async backend, and the two store backends.

Postgres tests get a fresh database each, cloned from a migrated template (fast). Under CI=true
an unreachable Postgres fails the run; elsewhere those tests skip with the reason.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from supervisor.store import Store, open_store
from supervisor.timing.clock import Clock, SystemClock, VirtualClock

PG_ADMIN = os.environ.get("ACP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"
TEMPLATE = f"acp_tpl_{uuid.uuid4().hex[:8]}"


def _uses_postgres(item: pytest.Item) -> bool:
    """Whether a test needs the Postgres server: it asks for `pg_url` (directly or through
    another fixture), or a backend fixture such as `store_url` is parametrized to Postgres."""
    if "pg_template" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "postgres" in callspec.params.values()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every Postgres test carries the `postgres` marker: `-m "not postgres"` runs SQLite only."""
    for item in items:
        if _uses_postgres(item):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _pg_url(database: str) -> str:
    base, _, _ = PG_ADMIN.rpartition("/")
    return f"{base}/{database}"


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _unreachable(reason: str) -> None:
    message = f"PostgreSQL at {PG_ADMIN} is unreachable: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: Postgres tests must run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    async def make() -> None:
        await _admin(f'CREATE DATABASE "{TEMPLATE}"')
        store = await open_store(_pg_url(TEMPLATE), SystemClock(), migrate=True)
        await store.close()

    try:
        asyncio.run(make())
    except (OSError, Exception) as exc:
        _unreachable(f"{type(exc).__name__}: {exc}")
    yield TEMPLATE
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated Postgres database for this test."""
    name = f"acp_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield _pg_url(name)
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(datetime(2026, 11, 2, 9, 0, tzinfo=UTC))


@pytest.fixture
async def store(store_url: str, clock: Clock) -> AsyncIterator[Store]:
    s = await open_store(store_url, clock, migrate=True)
    try:
        yield s
    finally:
        await s.close()
