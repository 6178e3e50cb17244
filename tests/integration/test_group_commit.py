"""Group commit: concurrent write transactions share one COMMIT on SQLite, and nobody is told
their write is durable before the COMMIT that holds it has returned (promise 2). The crash test
runs on both backends: whatever a writer was told is durable survives a SIGKILL."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from supervisor.errors import StateWriteError, StoreError
from supervisor.store import NewEvent, Store, open_store
from supervisor.store.sqlite import SQLiteBackend, parse_sqlite_url
from supervisor.timing.clock import SystemClock
from tests import storetools
from tests.crashing import told_before_kill
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


def _backend(store: Store) -> SQLiteBackend:
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    return backend


class _FailingCommit:
    """The store's own connection, except that the next COMMIT fails as a full disk would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.armed = False
        self.commits = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.commits += 1
            if self.armed:
                self.armed = False
                raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _db_path(url: str) -> str:
    return "/" + str(parse_sqlite_url(url)[0]).lstrip("/")


def _committed(url: str) -> set[tuple[str, int]]:
    path = _db_path(url)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {(s, int(q)) for s, q in conn.execute("SELECT session_id, seq FROM events")}
    finally:
        conn.close()


async def _write_all(store: Store, writers: int) -> list[tuple[str, int | None, str | None]]:
    """One state-bearing event per writer, all at once: (session, seq or None, error)."""
    results: list[tuple[str, int | None, str | None]] = []

    async def one(i: int) -> None:
        session = f"s{i}"
        try:
            seq = await store.append(NewEvent(kind="X", session_id=session))
        except StateWriteError as exc:
            results.append((session, None, str(exc)))
        else:
            results.append((session, seq, None))

    # A read holds the store's connection while every writer queues for it: they start
    # together, as a busy fleet's do, and form one batch behind the first.
    async with anyio.create_task_group() as tg, store.backend.reader():
        for i in range(writers):
            tg.start_soon(one, i)
        await anyio.wait_all_tasks_blocked()
    return results


async def test_concurrent_writers_share_commits_and_each_is_durable_when_told(
    sqlite_url: str,
) -> None:
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    commits: list[str] = []
    backend = _backend(store)
    conn = backend._require()
    conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        results = await _write_all(store, 50)
    finally:
        conn.set_trace_callback(None)
        await store.close()
    assert all(error is None for _s, _q, error in results), results
    assert {(s, q) for s, q, _e in results} == _committed(sqlite_url)
    assert len(results) == 50
    assert 1 <= len(commits) < 50, f"{len(commits)} COMMITs for 50 concurrent transactions"


async def test_a_lone_writer_commits_at_once(sqlite_url: str) -> None:
    """One writer waits for nobody: each of its transactions is its own COMMIT, committed
    before the call returns."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    try:
        for i in range(5):
            seq = await store.append(NewEvent(kind="X", session_id="alone"))
            assert seq == i + 1
            assert ("alone", seq) in _committed(sqlite_url)
    finally:
        await store.close()


async def test_a_failed_commit_fails_every_member_of_its_batch_closed(sqlite_url: str) -> None:
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    failing = _FailingCommit(backend._require())
    backend._conn = failing  # type: ignore[assignment]
    try:
        failing.armed = True
        results = await _write_all(store, 20)
        failed = [s for s, _q, error in results if error is not None]
        told_durable = {(s, q) for s, q, error in results if error is None and q is not None}
        committed = _committed(sqlite_url)
        assert len(failed) >= 2, "the failed COMMIT held one transaction only"
        assert all("sqlite commit failed" in str(e) for _s, _q, e in results if e is not None)
        assert told_durable == committed, "a writer was told durable for a write not committed"
        assert not any(s in failed for s, _q in committed)
        # The store goes on: the next write commits.
        assert await store.append(NewEvent(kind="X", session_id="after")) == 1
        assert ("after", 1) in _committed(sqlite_url)
    finally:
        backend._conn = failing._conn
        await store.close()


async def test_a_transaction_that_raises_leaves_the_rest_of_its_batch_alone(
    sqlite_url: str,
) -> None:
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    outcomes: dict[int, str] = {}

    async def one(i: int) -> None:
        try:
            async with storetools.transaction(store) as tx:
                await store.append_in(tx, NewEvent(kind="X", session_id=f"s{i}"))
                if i % 3 == 0:
                    raise RuntimeError("the caller changed its mind")
        except RuntimeError:
            outcomes[i] = "raised"
        else:
            outcomes[i] = "committed"

    try:
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
    finally:
        await store.close()
    committed = {s for s, _q in _committed(sqlite_url)}
    assert committed == {f"s{i}" for i, o in outcomes.items() if o == "committed"}
    assert len(committed) == 20


async def test_reads_between_batches_see_committed_rows_only(sqlite_url: str) -> None:
    """A read on the store's connection while a batch is open returns only once that batch is
    committed, so whatever it saw is on disk by then."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    seen: list[int] = []

    async def reader() -> None:
        for _ in range(40):
            async with store.backend.reader() as tx:
                row = await tx.fetchrow("stream_seq", "s0")
            if row is not None and row["last_seq"]:
                seen.append(int(row["last_seq"]))
                assert ("s0", seen[-1]) in _committed(sqlite_url), "a read saw an uncommitted row"
            await anyio.lowlevel.checkpoint()

    async def writer() -> None:
        for _ in range(20):
            await store.append(NewEvent(kind="X", session_id="s0"))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            tg.start_soon(reader)
    finally:
        await store.close()
    assert seen


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchall(self) -> list[Any]:
        return self._rows


class _WatchedCommits:
    """The store's own connection, noting which thread ran each COMMIT (and slowing it down
    when asked, as a degraded disk would)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.threads: list[int] = []
        self.checkpoints: list[int] = []
        self.delay = 0.0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.threads.append(threading.get_ident())
            if self.delay:
                time.sleep(self.delay)
        if sql.startswith("PRAGMA wal_checkpoint"):
            self.checkpoints.append(threading.get_ident())
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_lone_writer_commits_on_the_loop_until_the_disk_is_slow(sqlite_url: str) -> None:
    """One writer alone: the COMMIT's hand-off to a thread costs more than its fsync, so it
    runs on the loop. One COMMIT slower than the limit sends the next ones to a thread (the
    loop is held at most once by a disk that degrades); concurrent writers always use one."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    watched = _WatchedCommits(backend._require())
    backend._conn = watched  # type: ignore[assignment]
    loop_thread = threading.get_ident()
    assert backend._threaded_until == 0.0, "a migration's COMMIT counted as the disk's"
    try:
        for _ in range(3):
            await store.append(NewEvent(kind="X", session_id="alone"))
        assert watched.threads == [loop_thread] * 3
        watched.delay = 0.02  # slower than the limit: this one still runs on the loop
        await store.append(NewEvent(kind="X", session_id="alone"))
        watched.delay = 0.0
        watched.threads.clear()
        await store.append(NewEvent(kind="X", session_id="alone"))
        assert watched.threads and loop_thread not in watched.threads
        backend._threaded_until = 0.0  # the pause is over
        watched.threads.clear()
        await _write_all(store, 10)  # one batch of ten
        assert watched.threads and loop_thread not in watched.threads
    finally:
        backend._conn = watched._conn
        await store.close()


async def test_checkpoints_run_in_a_thread_never_inside_a_commit(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's automatic checkpoint would run inside the COMMIT that crosses its threshold,
    on the loop when the COMMIT runs there (115-207 ms measured on a large store): it is off
    on the store's connection, and every so many COMMITs a checkpoint runs in a thread."""
    from supervisor.store import sqlite as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "_FIRST_CHECKPOINT_AFTER", 10)
    monkeypatch.setattr(sqlite_backend, "_CHECKPOINT_BYTES", 1)  # then every 10, the least
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    conn = backend._require()
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    watched = _WatchedCommits(conn)
    backend._conn = watched  # type: ignore[assignment]
    loop_thread = threading.get_ident()
    try:
        for _ in range(25):
            await store.append(NewEvent(kind="X", session_id="s"))
    finally:
        backend._conn = watched._conn
        await store.close()
    # On the loop but while a checkpoint syncs the database file (its fsync would wait for that)
    assert watched.threads.count(loop_thread) >= 15, "the lone writer's COMMITs ran on the loop"
    assert len(watched.checkpoints) >= 2 and loop_thread not in watched.checkpoints
    assert len(_committed(sqlite_url)) == 25


async def test_writers_go_on_while_a_checkpoint_copies_the_wal(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bulk of a checkpoint runs on a connection of its own: writers are not held while it
    copies the WAL and syncs the database file (about 50 ms on a store of a million events,
    with the connection's lock held, before). Then a short one on the store's connection lets
    the WAL restart, so it does not grow without end."""
    from supervisor.store import sqlite as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "_FIRST_CHECKPOINT_AFTER", 10)
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    opened = backend._open_checkpointer
    copying = threading.Event()

    class _SlowCheckpointer:
        """Its copy takes 0.5 s, and the writes meanwhile are left in the WAL (a reader's
        snapshot from before them keeps it from copying those, as writes during a real copy
        do): only a checkpoint after it can copy them, and only then may the WAL restart."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self._conn = conn

        def execute(self, sql: str, *args: Any) -> Any:
            if not sql.startswith("PRAGMA wal_checkpoint"):
                return self._conn.execute(sql, *args)
            reader = sqlite3.connect(backend.path, isolation_level=None)
            try:
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM events").fetchall()
                copying.set()
                time.sleep(0.5)
                rows = self._conn.execute(sql, *args).fetchall()
            finally:
                reader.close()
            return _Rows(rows)

        def close(self) -> None:
            self._conn.close()

    monkeypatch.setattr(backend, "_open_checkpointer", lambda: _SlowCheckpointer(opened()))
    try:
        for n in range(10):
            await store.append(NewEvent(kind="X", session_id="s", payload={"n": n}))
        await eventually(lambda: copying.is_set() or None, "the checkpoint to start copying",
                         within=5, every=0.001)  # fmt: skip
        began = time.perf_counter()
        for n in range(20):
            await store.append(NewEvent(kind="Y", session_id="s", payload={"n": n}))
        took = time.perf_counter() - began
        assert backend._checkpointer.running, "the checkpoint is still copying"
        assert took < 0.4, f"20 writes took {took:.2f} s behind the checkpoint"
        await eventually(lambda: (not backend._checkpointer.running) or None,
                         "the checkpoint's copy to end", within=5)  # fmt: skip
        await store.append(NewEvent(kind="Z", session_id="s"))  # the store's half
        await store.append(NewEvent(kind="Z", session_id="s"))  # the WAL restarts
        other = sqlite3.connect(backend.path)
        try:  # the frames the WAL holds now: only the last write's when it restarted
            _busy, frames, _copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            other.close()
    finally:
        await store.close()
    assert 0 < frames < 10, f"the WAL did not restart ({frames} frames)"
    assert len(_committed(sqlite_url)) == 32


async def test_checkpoints_come_as_the_wal_grows_by_its_target_size(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint is due once the WAL has grown by about _CHECKPOINT_BYTES, at the pages a
    COMMIT wrote since the last one: small COMMITs are checkpointed together instead of every
    so many (each checkpoint copies a page once, however many COMMITs rewrote it), and larger
    ones bring the next one sooner."""
    from supervisor.store import sqlite as sqlite_backend

    target = 2 * 1024 * 1024
    monkeypatch.setattr(sqlite_backend, "_FIRST_CHECKPOINT_AFTER", 20)
    monkeypatch.setattr(sqlite_backend, "_CHECKPOINT_BYTES", target)
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    watched = _WatchedCommits(backend._require())
    backend._conn = watched  # type: ignore[assignment]
    try:
        for n in range(600):  # one event a COMMIT: a few pages each
            await store.append(NewEvent(kind="X", session_id="s", payload={"n": n}))
        small, small_every = len(watched.checkpoints), backend._checkpoint_every
        for n in range(200):  # a large payload a COMMIT: a dozen pages more each
            await store.append(NewEvent(kind="Y", session_id="s", payload={"x": f"{n}" * 48_000}))
        await eventually(lambda: (not backend._checkpointer.running) or None,
                         "the checkpoint's copy to end", within=5)  # fmt: skip
        await store.append(NewEvent(kind="Z", session_id="s"))  # its second half, if due
    finally:
        backend._conn = watched._conn
        await store.close()
    assert 2 <= small < 600 // 20, "checkpoints are due by the WAL's growth, not every 20"
    assert len(watched.checkpoints) > small
    # A dozen times the pages a COMMIT: the next checkpoint comes after far fewer of them.
    assert backend._checkpoint_every * 4 < small_every, "larger COMMITs bring the next sooner"
    assert len(_committed(sqlite_url)) == 801


async def test_writers_that_never_wait_still_share_commits(sqlite_url: str) -> None:
    """Writers whose work never waits on anything else (the gate's with nothing but the store
    to wait on): a COMMIT on the loop for each, and each would run alone, one after another.
    The batch's leader lets every ready task run before it commits, so they join it."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    commits: list[str] = []
    conn = _backend(store)._require()
    conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)

    async def writer(i: int) -> None:
        for _ in range(5):
            await store.append(NewEvent(kind="X", session_id=f"s{i}"))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(writer, i)
    finally:
        conn.set_trace_callback(None)
        await store.close()
    assert len(_committed(sqlite_url)) == 100
    assert len(commits) <= 30, f"{len(commits)} COMMITs for 100 writes by 20 writers"


async def test_a_read_does_not_cut_a_batch_short(sqlite_url: str) -> None:
    """Workers read between their writes (an action's last look): a read queued between two
    writers runs inside their open batch instead of committing it early, so they still share
    one COMMIT, and it returns once that COMMIT has."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    commits: list[str] = []
    conn = _backend(store)._require()
    conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    order: list[str] = []

    async def write(name: str) -> None:
        await store.append(NewEvent(kind="X", session_id=name))
        order.append(name)

    async def read() -> None:
        async with store.backend.reader() as tx:
            await tx.fetchrow("stream_seq", "a")
        assert ("a", 1) in _committed(sqlite_url), "the read returned before the batch's COMMIT"
        order.append("read")

    try:
        # Queued in this order behind a held read: writer a (opens the batch), the read,
        # writer b (joins it), then a's COMMIT.
        async with anyio.create_task_group() as tg, store.backend.reader():
            for step in (partial(write, "a"), read, partial(write, "b")):
                tg.start_soon(step)
                await anyio.wait_all_tasks_blocked()
    finally:
        conn.set_trace_callback(None)
        await store.close()
    assert _committed(sqlite_url) == {("a", 1), ("b", 1)}
    assert len(commits) == 1, f"{len(commits)} COMMITs: the read committed the batch early"
    assert sorted(order) == ["a", "b", "read"]


async def test_a_read_inside_a_batch_fails_with_the_batch(sqlite_url: str) -> None:
    """A read that ran inside an open batch may have seen its writes before they were durable:
    when that batch's COMMIT fails, the read fails too, so nothing acts on what it saw."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    failing = _FailingCommit(backend._require())
    backend._conn = failing  # type: ignore[assignment]
    seen: list[int] = []
    read_error: list[str] = []

    async def write() -> None:
        with pytest.raises(StateWriteError):
            await store.append(NewEvent(kind="X", session_id="s0"))

    async def read() -> None:
        try:
            async with store.backend.reader() as tx:
                row = await tx.fetchrow("stream_seq", "s0")
                assert row is not None
                seen.append(int(row["last_seq"]))
        except StateWriteError as exc:
            read_error.append(str(exc))

    try:
        failing.armed = True
        # Queued in this order behind a held read: the writer opens the batch, the reader
        # reads inside it, then the writer's COMMIT (which fails).
        async with anyio.create_task_group() as tg, store.backend.reader():
            tg.start_soon(write)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
    finally:
        backend._conn = failing._conn
        await store.close()
    assert seen == [1], "the read ran inside the open batch and saw its uncommitted event"
    assert read_error and "sqlite commit failed" in read_error[0]
    assert _committed(sqlite_url) == set()


class _RollbackInRead:
    """The store's own connection, except that the next `stream_seq` read finds SQLite has
    ended the open transaction (as an I/O error, a full disk or no memory can), and another
    process commits a row before the error reaches the store."""

    def __init__(self, conn: sqlite3.Connection, query: str, other: sqlite3.Connection) -> None:
        self._conn = conn
        self._query = query
        self._other = other
        self.armed = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.armed and sql == self._query:
            self.armed = False
            self._conn.execute("ROLLBACK")
            self._other.execute("INSERT INTO streams (id, last_seq) VALUES ('cli', 1)")
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_batch_sqlite_ended_during_a_read_fails_and_the_next_writer_begins_anew(
    sqlite_url: str,
) -> None:
    """SQLite may end a write transaction itself when a statement in it fails (I/O, a full
    disk): the batch fails closed, and the next writer begins a transaction of its own, where
    the switch cache's stamp is read afresh (another process may have committed meanwhile),
    instead of joining a batch that is no longer open."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    other = sqlite3.connect(_db_path(sqlite_url), isolation_level=None, timeout=10)
    failing = _RollbackInRead(backend._require(), backend._queries["stream_seq"], other)
    backend._conn = failing  # type: ignore[assignment]
    got: dict[str, Any] = {}

    async def first() -> None:
        try:
            async with store.backend.transaction() as tx:
                await tx.change_stamp()  # the batch's data_version, read once
                await store.append_in(tx, NewEvent(kind="X", session_id="first"))
        except StateWriteError as exc:
            got["first"] = str(exc)

    async def read() -> None:
        try:
            async with store.backend.reader() as tx:
                await tx.fetchrow("stream_seq", "first")
        except StoreError as exc:
            got["read"] = str(exc)

    async def second() -> None:
        async with store.backend.transaction() as tx:
            got["stamp"] = (await tx.change_stamp())[0]
            got["version"] = failing._conn.execute("PRAGMA data_version").fetchone()[0]
            await store.append_in(tx, NewEvent(kind="X", session_id="second"))

    try:
        # Queued in this order behind a held read: the first writer opens the batch, the
        # read fails inside it, the second writer comes after.
        async with anyio.create_task_group() as tg, store.backend.reader():
            for step in (first, read, second):
                tg.start_soon(step)
                await anyio.wait_all_tasks_blocked()
    finally:
        backend._conn = failing._conn
        other.close()
        await store.close()
    assert "read" in got, "the failing read did not fail"
    assert "rolled back" in got.get("first", ""), got
    assert got["stamp"] == got["version"], "the second writer's stamp came from the ended batch"
    assert _committed(sqlite_url) == {("second", 1)}


CHILD = """
import sys
import anyio
from supervisor.timing.clock import SystemClock
from supervisor.store import NewEvent, open_store

async def main(url):
    store = await open_store(url, SystemClock(), migrate=True)

    async def writer(i):
        while True:
            seq = await store.append(NewEvent(kind="X", session_id="w%d" % i))
            sys.stdout.write("w%d %d\\n" % (i, seq))
            sys.stdout.flush()

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(writer, i)

anyio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_crash_mid_batch_loses_only_what_nobody_was_told_was_durable(
    store_url: str, tmp_path: Path
) -> None:
    # Blocking reads on purpose (in told_before_kill): nothing else runs on this test's loop.
    lines = told_before_kill(CHILD, store_url, tmp_path, at_least=2000)
    told = [(name, int(seq)) for name, seq in (line.split() for line in lines)]
    store = await open_store(store_url, SystemClock())
    try:
        missing = []
        for name, seq in told:
            events = await store.replay(name, after=seq - 1, limit=1)
            if not events or events[0].seq != seq:
                missing.append((name, seq))
    finally:
        await store.close()
    assert not missing, f"{len(missing)} writes were reported durable and are not: {missing[:5]}"


async def test_the_checkpointer_opens_no_file_put_in_the_databases_place(sqlite_url: str) -> None:
    """The checkpointer opens its connection by name: a file put where the database was (the
    store's next COMMIT fails closed on it) must not be handed this store's WAL pages."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    path = backend.path
    try:
        await store.append(NewEvent(kind="X", session_id="s"))
        forged = path.with_name("forged.db")
        other = sqlite3.connect(forged)
        other.execute("CREATE TABLE t (x)")
        other.close()
        planted = forged.read_bytes()
        await anyio.to_thread.run_sync(os.replace, forged, path)
        checkpointer = backend._checkpointer
        checkpointer.start()
        await eventually(lambda: checkpointer.done or None, "the checkpointer's run", within=5)
        assert checkpointer._conn is None, "it opened the file now at the database's path"
        assert path.read_bytes() == planted, "the file put in its place was written"
    finally:
        await store.close()


async def test_the_wal_stays_near_its_target_when_commits_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet spell of lone writers, then a busy fleet whose COMMITs hold fifty transactions
    each: the COMMIT count learnt in the quiet spell would let the WAL grow by as much as the
    COMMITs did (a review measured 15 times the target). A WAL's file half as large again as
    the target brings the checkpoint sooner."""
    from supervisor.store import sqlite as sqlite_backend

    target = 2 * 1024 * 1024
    monkeypatch.setattr(sqlite_backend, "_CHECKPOINT_BYTES", target)
    url = f"sqlite:///{tmp_path / 'grow.db'}?synchronous=normal"
    store = await open_store(url, SystemClock(), migrate=True)
    backend = _backend(store)
    wal = tmp_path / "grow.db-wal"
    peak = 0
    try:
        for _ in range(300):
            await store.append(NewEvent(kind="X", session_id="quiet"))
        learnt = backend._checkpoint_every
        for r in range(150):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    event = NewEvent(kind="Y", session_id=f"s{i}", payload={"r": r, "p": "x" * 300})
                    tg.start_soon(store.append, event)
            peak = max(peak, await anyio.to_thread.run_sync(os.path.getsize, wal))
    finally:
        await store.close()
    assert learnt > 100, "the quiet spell's COMMITs were small"
    assert peak <= 4 * target, (
        f"WAL grew to {peak / 2**20:.1f} MB against a {target >> 20} MB target"
    )


async def test_no_thread_for_a_checkpoint_fails_no_write(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpointer starts after a COMMIT whose writers were told it landed: a thread it
    cannot have (a process at its limit) must not make the leader's write raise, nor leave
    the checkpointer looking busy for good (no checkpoint would ever come again)."""
    from supervisor.store import sqlite as sqlite_backend

    class _NoThreads:
        class Thread(threading.Thread):
            def start(self) -> None:
                raise RuntimeError("can't start new thread")

    monkeypatch.setattr(sqlite_backend, "_FIRST_CHECKPOINT_AFTER", 10)
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    try:
        monkeypatch.setattr(sqlite_backend, "threading", _NoThreads)
        for n in range(15):  # the tenth COMMIT makes a checkpoint due
            await store.append(NewEvent(kind="X", session_id="s", payload={"n": n}))
        assert not backend._checkpointer.running
        monkeypatch.setattr(sqlite_backend, "threading", threading)
        await store.append(NewEvent(kind="X", session_id="s"))
        assert backend._checkpointer._thread is not None, "the next COMMIT starts one"
    finally:
        await store.close()
    assert len(_committed(sqlite_url)) == 16


async def test_a_busy_checkpoints_answer_is_no_frame_count(sqlite_url: str) -> None:
    """While another connection checkpoints, SQLite answers (1, -1, -1): no count of the WAL's
    frames, and the interval learnt from the last real one stays (it became 10 COMMITs)."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    backend = _backend(store)
    try:
        backend._checkpoint_every = 500
        backend._checkpoint_due(-1)
        assert backend._checkpoint_every == 500
    finally:
        await store.close()
