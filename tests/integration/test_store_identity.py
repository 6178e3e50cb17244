"""The SQLite file under the store: a database deleted or replaced while open is noticed on the
next commit (and by `lost()`, which the daemon polls); at startup a missing database where its
identity file says a store lived is refused, unless `db migrate --new`. The database file is
0600 and the state directory 0700 whatever the umask. The host kill-switch mark in the store
only moves up."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.errors import StateWriteError, StoreConfigError, StoreLost
from supervisor.statedir import make_state_dir
from supervisor.store import NewEvent, Store, open_store, system_stream
from supervisor.timing.clock import SystemClock
from tests import storetools

pytestmark = pytest.mark.anyio


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def identity_of(path: Path) -> Path:
    return path.with_name(path.name + ".identity")


async def append(store: Store) -> None:
    await store.append(NewEvent(kind="RECOVERY", session_id=system_stream("f"), payload={}))


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_new_store_writes_its_identity_beside_the_file(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await open_store(url_of(db), SystemClock(), migrate=True)
    try:
        identity = await store.identity()
    finally:
        await store.close()
    assert identity and identity_of(db).read_text().strip() == identity
    # Reopening the same store is fine, and the identity stays.
    store = await open_store(url_of(db), SystemClock())
    assert await store.identity() == identity
    await store.close()


async def test_deleted_database_is_refused_at_startup_not_recreated(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    await (await open_store(url_of(db), SystemClock(), migrate=True)).close()
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreConfigError, match=r"missing.*db migrate --new"):
        await open_store(url_of(db), SystemClock(), migrate=True)
    assert not db.exists()  # no fresh, empty ledger left behind


async def test_migrate_new_begins_a_new_store_where_one_was(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    first = await open_store(url_of(db), SystemClock(), migrate=True)
    old_id = await first.identity()
    await first.close()
    db.unlink()
    store = await open_store(url_of(db), SystemClock(), migrate=True, new=True)
    new_id = await store.identity()
    await store.close()
    assert new_id and new_id != old_id
    assert identity_of(db).read_text().strip() == new_id
    store = await open_store(url_of(db), SystemClock())  # and from now on it is the store here
    await store.close()


async def test_replaced_database_is_refused_at_startup(tmp_path: Path) -> None:
    db, other = tmp_path / "s.db", tmp_path / "other" / "s.db"
    other.parent.mkdir()
    for path in (db, other):
        await (await open_store(url_of(path), SystemClock(), migrate=True)).close()
    shutil.copyfile(other, db)
    with pytest.raises(StoreConfigError, match="was replaced"):
        await open_store(url_of(db), SystemClock())


async def test_database_without_an_identity_file_gets_one(tmp_path: Path) -> None:
    """An existing deployment upgraded: the identity file is written on the next open."""
    db = tmp_path / "s.db"
    await (await open_store(url_of(db), SystemClock(), migrate=True)).close()
    identity_of(db).unlink()
    store = await open_store(url_of(db), SystemClock())
    assert identity_of(db).read_text().strip() == await store.identity()
    await store.close()


@pytest.mark.parametrize(
    ("how", "suffix"), [("deleted", ""), ("replaced", ""), ("deleted", "-wal")],
    ids=["deleted", "replaced", "wal-deleted"],
)  # fmt: skip
async def test_database_gone_while_open_fails_every_commit(
    tmp_path: Path, how: str, suffix: str
) -> None:
    db = tmp_path / "s.db"
    store = await open_store(url_of(db), SystemClock(), migrate=True)
    try:
        await append(store)
        assert store.backend.lost() is None
        if how == "deleted":
            db.with_name(db.name + suffix).unlink()
        else:
            other = tmp_path / "other.db"
            await (await open_store(url_of(other), SystemClock(), migrate=True)).close()
            os.replace(other, db)
        problem = store.backend.lost()
        assert problem is not None and how in problem
        with pytest.raises(StoreLost, match=how):
            await append(store)
        with pytest.raises(StateWriteError):  # a state-bearing write: the caller stops
            async with storetools.transaction(store) as tx:
                await tx.execute("ensure_fleet_switch", "f", store.clock.now())
    finally:
        await store.close()


async def test_database_file_is_0600_and_state_dir_0700_whatever_the_umask(
    tmp_path: Path, umask0: None
) -> None:
    state = tmp_path / "state" / "deeper"
    make_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    db = state / "s.db"
    store = await open_store(url_of(db), SystemClock(), migrate=True)
    await append(store)
    for path in (db, db.with_name("s.db-wal"), db.with_name("s.db-shm")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    await store.close()


def test_cli_state_dir_is_0700_under_a_permissive_umask(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    result = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" -m supervisor --state-dir "$1" db migrate',
         sys.executable, str(state)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    [db] = [p for p in state.iterdir() if p.suffix == ".db"]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_cli_refuses_a_deleted_database_and_migrate_new_recovers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    db = tmp_path / "s.db"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", "--db", url_of(db), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip

    assert cli("db", "migrate").returncode == 0
    db.unlink()
    refused = cli("db", "migrate")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "missing" in line and "db migrate --new" in line
    assert not db.exists()
    assert cli("db", "migrate", "--new").returncode == 0
    assert cli("sessions", "list").returncode == 0


async def test_host_switch_mark_only_moves_up(store: Store) -> None:
    assert await store.host_switch_mark("f", "h1") == 0
    await store.raise_host_switch_mark("f", "h1", 5)
    await store.raise_host_switch_mark("f", "h1", 3)
    await store.raise_host_switch_mark("f", "h2", 1)
    assert await store.host_switch_mark("f", "h1") == 5
    assert await store.host_switch_mark("f", "h2") == 1
    await store.raise_host_switch_mark("f", "h1", 6)
    assert await store.host_switch_mark("f", "h1") == 6


async def test_unreadable_identity_file_never_hangs_and_still_guards_a_missing_database(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    await (await open_store(url_of(db), SystemClock(), migrate=True)).close()
    identity_of(db).unlink()
    os.mkfifo(identity_of(db))  # a pipe: reading it would block
    store = await open_store(url_of(db), SystemClock())  # an existing database still opens
    await store.close()
    db.unlink()
    with pytest.raises(StoreConfigError, match="unreadable"):
        await open_store(url_of(db), SystemClock(), migrate=True)
    assert not db.exists()


async def test_database_deleted_with_its_wal_left_behind_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await open_store(url_of(db), SystemClock(), migrate=True)
    await append(store)
    os.link(db.with_name("s.db-wal"), tmp_path / "kept-wal")  # the WAL survives the deletion
    await store.close()
    db.unlink()
    os.link(tmp_path / "kept-wal", db.with_name("s.db-wal"))
    with pytest.raises(StoreConfigError, match="missing"):
        await open_store(url_of(db), SystemClock(), migrate=True)
