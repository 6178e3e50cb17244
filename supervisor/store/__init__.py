"""The durable store. `open_store(url, clock)` picks the backend from the URL scheme and imports
only that backend's driver."""

from __future__ import annotations

from ..errors import StoreConfigError
from ..timing.clock import Clock
from .base import DEFAULT_QUERY_TIMEOUT, Backend, Event, NewEvent, Session, Tx, system_stream
from .queries import load_migrations
from .repository import Store

__all__ = ["Backend", "Event", "NewEvent", "Session", "Store", "Tx", "open_store", "system_stream"]


def make_backend(url: str, *, query_timeout: float = DEFAULT_QUERY_TIMEOUT) -> Backend:
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise StoreConfigError(
            f"malformed database URL {url!r}: expected sqlite:///path or postgresql://..."
        )
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresBackend

        return PostgresBackend(url, query_timeout=query_timeout)
    raise StoreConfigError(f"unknown database scheme {scheme!r} in {url!r} (sqlite, postgresql)")


async def open_store(
    url: str,
    clock: Clock,
    *,
    migrate: bool = False,
    new: bool = False,
    query_timeout: float = DEFAULT_QUERY_TIMEOUT,
) -> Store:
    """Connect; with migrate=True bring the schema up to date, else require it to be current.

    A SQLite database whose file is missing or replaced while its state directory remembers
    another store is refused (StoreConfigError) unless `new` (`db migrate --new`).
    `query_timeout` bounds each statement on a networked backend (Postgres)."""
    backend = make_backend(url, query_timeout=query_timeout)
    backend.create = migrate  # a read never leaves an empty database file behind
    latest = max(v for v, _n, _s in load_migrations(backend.dialect))
    if new:
        backend.allow_new = True
    await backend.connect()
    store = Store(backend, clock, latest_version=latest)
    try:
        if migrate:
            await store.migrate()
        await store.check_schema()
        await backend.check_identity(await store.identity())
    except BaseException:
        await backend.close()
        raise
    return store
