"""SQLite backend: one connection in WAL mode, writes serialized by a lock.

Why not one thread hop per statement (aiosqlite): measured on this project's 2-core machine an
aiosqlite round trip costs about 75 us, and a governed action takes a dozen statements. Here the
statements run on the event loop (microseconds each on a page-cached WAL database) and only the
calls that can wait on the disk or another process's lock, BEGIN IMMEDIATE and COMMIT (the fsync),
go to a worker thread. See docs/design.md.

Scans whose cost grows with the event log (the scorecard, a replay page) are the exception: they
run in a worker thread on read-only connections of their own (read_off_loop), so the loop never
waits for them; WAL lets them read a snapshot while the main connection writes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog

from ..errors import DatabaseMissing, StateWriteError, StoreConfigError, StoreError, StoreLost
from ..statedir import atomic_write
from .base import Backend, Reads, Row, UniqueViolation
from .queries import load_queries

_BOOL_COLUMNS = frozenset({"state_bearing", "critical", "safe_to_retry", "simulated"})
_WRITE_WAIT = 30.0  # seconds a write waits for another process holding the lock
_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}
# A store of a million events is some 500 MB. SQLite's default page cache (2 MB per connection)
# holds little more than the indexes' upper levels, so every scan and many point reads went to
# the OS for pages. 64 MB keeps the hot pages (recent events, sessions, actions, the ledger's
# index) in the connection; memory-mapped reads (256 MB) let the scans read the file through the
# OS page cache without copying each page into SQLite's, shared by all our connections.
_CACHE_KIB = 64 * 1024
_MMAP_BYTES = 256 * 1024 * 1024
_IDLE_READERS = 2  # read-only connections kept open for read_off_loop (the machine's cores)
_READ_WAIT = 5.0  # seconds a reader in its thread waits on a busy database (WAL recovery)
# A lone writer's COMMIT runs on the loop while this disk's COMMITs take less than this: the
# hand-off to a thread and back cost more than the fsync itself (measured on this machine's
# disk: 414 us a commit through a thread, 234 us inline; one worker makes two per action), and
# a few milliseconds on the loop are far inside its lag budget (50 ms). One slower COMMIT sends
# every COMMIT to a thread for _SLOW_DISK_PAUSE, so a disk that degrades holds the loop once,
# for one fsync.
_INLINE_COMMIT_LIMIT = 0.010  # seconds
_SLOW_DISK_PAUSE = 10.0  # seconds
# SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold: it copies the
# WAL into the database file and fsyncs that, which on a large store took 115-207 ms, on the
# loop when the COMMIT ran there. It is off on the store's connection; once the WAL has grown by
# this much, one runs in a thread instead. A checkpoint copies each page once however many
# COMMITs rewrote it, so fewer, larger ones cost less in all (measured: one every 200 COMMITs,
# about 12 MB of a simulation's WAL, made a tenth of a simulated month).
_CHECKPOINT_BYTES = 64 * 1024 * 1024
_FIRST_CHECKPOINT_AFTER = 200  # COMMITs, before the first checkpoint has measured the rate
_CHECKPOINT_AFTER_AT_MOST = 10_000  # COMMITs (small ones: a tiny WAL, still checkpointed)

T = TypeVar("T")
log = structlog.get_logger(__name__)


def _wal_checkpoint(conn: sqlite3.Connection) -> int:
    """A PASSIVE checkpoint on `conn` (it waits for no reader; what a reader still needs is
    copied by a later one): the WAL's frames as it began, -1 when another connection's was
    running. Its row is read to the end: a cursor left holding it (a worker thread keeps its
    last result until its next job) is a statement in progress, and the next COMMIT fails
    ("SQL statements in progress")."""
    return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][1])


# The instant last written as text, as one tuple (threads encode too: one assignment is
# atomic). A statement's times are mostly one `clock.now()`, and on the virtual clock one
# object serves a whole slot, so most are written without converting them again.
_last_instant: tuple[datetime | None, str] = (None, "")


def _iso(value: datetime) -> str:
    global _last_instant
    last = _last_instant
    if value is last[0]:
        return last[1]
    if value.tzinfo is None:
        raise ValueError("naive datetime passed to the store")
    text = value.astimezone(UTC).isoformat(timespec="microseconds")
    _last_instant = (value, text)
    return text


def _encoded(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple([_iso(v) if isinstance(v, datetime) else v for v in args])


Decoder = Callable[[sqlite3.Row], Row]
# One decoder per result shape (its column names), made on first sight: which columns hold
# times and flags is decided once, not for every column of every row.
_DECODERS: dict[tuple[str, ...], Decoder] = {}


def _decoder(cursor: sqlite3.Cursor) -> Decoder:
    names = tuple(d[0] for d in cursor.description)
    found = _DECODERS.get(names)
    if found is not None:
        return found
    times = [n for n in names if n.endswith("_at") or n == "deadline"]
    flags = [n for n in names if n in _BOOL_COLUMNS]

    def decode(row: sqlite3.Row) -> Row:
        out: Row = dict(zip(names, row, strict=True))
        for key in times:
            value = out[key]
            if value is not None:
                out[key] = datetime.fromisoformat(value)
        for key in flags:
            value = out[key]
            if value is not None:
                out[key] = bool(value)
        return out

    _DECODERS[names] = decode
    return decode


def _size_cache(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")


def parse_sqlite_url(url: str) -> tuple[Path, str]:
    """`sqlite:///abs/path.db` or `sqlite://relative/path.db`, optional `?synchronous=normal`."""
    rest = url[len("sqlite://") :]
    path_part, _, query = rest.partition("?")
    if not path_part or path_part == "/":
        raise StoreConfigError(f"database URL {url!r} names no file (sqlite:///path/to/file.db)")
    options = parse_qs(query)
    sync = options.pop("synchronous", ["full"])[0].lower()
    if sync not in _SYNC_MODES:
        raise StoreConfigError(f"database URL {url!r}: synchronous must be full, normal or extra")
    if options:
        raise StoreConfigError(f"database URL {url!r}: unknown option {sorted(options)[0]!r}")
    return Path(path_part), _SYNC_MODES[sync]


class _ConnectionLock:
    """The connection's lock: first come, first served, for the tasks of one event loop.

    anyio.Lock looks the current task up on every acquire and release: at two or three
    acquisitions per transaction, about 5% of a simulated month's CPU. Here a free lock is a
    flag (after the same cancellation check); a taken one queues an Event and the releaser
    hands the lock to the first waiter (ownership passes, so nobody can overtake the queue).
    Waiting is cancellable; a waiter cancelled after it was handed the lock passes it on."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[anyio.Event] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if not self._held:
            # As anyio's: a cancelled task gets no lock (else it might write, and run on to
            # an effect, before anything else would notice it was cancelled).
            await anyio.lowlevel.checkpoint_if_cancelled()
            self._held = True
            return
        handed = anyio.Event()
        self._waiters.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()  # it was ours already: the next in line gets it
            else:
                self._waiters.remove(handed)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # still held: it passes to the first waiter
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Batch:
    """Transactions sharing one COMMIT. `error` is what every member raises, None when the
    COMMIT returned."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: Exception | None = None
        self.members = 0
        # PRAGMA data_version as the batch first read it: while its write transaction is
        # open no other connection can commit, so it cannot move before the COMMIT.
        self.version: int | None = None
        self.timed = True  # its COMMIT's time says how fast this disk commits (not a migration's)

    def settle(self, error: Exception | None) -> None:
        self.error = error
        self.done.set()


class _SQLiteTx:
    def __init__(
        self, conn: sqlite3.Connection, queries: dict[str, str], write: bool, rollbacks: int,
        batch: _Batch | None,
    ) -> None:  # fmt: skip
        self._conn = conn
        self._q = queries
        self._write = write
        self._rollbacks = rollbacks
        self._batch = batch  # the write transaction this runs in, if one is open

    def _run(self, name: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self._conn.execute(self._q[name], _encoded(args))
        except sqlite3.Error as exc:
            raise self._translate(name, exc) from exc

    def _translate(self, name: str, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.IntegrityError):
            if "UNIQUE" in str(exc):
                return UniqueViolation(f"{name}: {exc}")
            return StateWriteError(f"{name}: {exc}")
        error = StateWriteError if self._write else StoreError
        return error(f"sqlite {name}: {exc}")

    async def executemany(self, name: str, rows: Sequence[tuple[Any, ...]]) -> None:
        try:
            self._conn.executemany(self._q[name], [_encoded(r) for r in rows])
        except sqlite3.Error as exc:
            raise self._translate(name, exc) from exc

    async def execute(self, name: str, *args: Any) -> int:
        return self._run(name, args).rowcount

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        cursor = self._run(name, args)
        row = cursor.fetchone()
        return _decoder(cursor)(row) if row is not None else None

    async def fetchval(self, name: str, *args: Any) -> Any:
        row = self._run(name, args).fetchone()
        return row[0] if row is not None else None

    async def fetchall(self, name: str, *args: Any) -> list[Row]:
        cursor = self._run(name, args)
        rows = cursor.fetchall()
        if not rows:
            return []
        decode = _decoder(cursor)
        return [decode(r) for r in rows]

    async def change_stamp(self) -> tuple[int, int]:
        """`PRAGMA data_version` moves when another connection commits (a CLI's engage, say),
        never for this connection's own writes; a rollback here (a member's, a batch's) is
        counted beside it, since it undoes writes a cache may have seen. Read once per batch
        (see _Batch.version)."""
        batch = self._batch
        if batch is not None and batch.version is not None and self._conn.in_transaction:
            return batch.version, self._rollbacks
        try:
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            error = StateWriteError if self._write else StoreError
            raise error(f"sqlite data_version: {exc}") from exc
        if batch is not None:
            batch.version = version
        return version, self._rollbacks


class SQLiteBackend(Backend):
    dialect = "sqlite"
    rows_per_loop_turn = 64  # events: about 2.5 ms of the loop on a slow afternoon

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, self._sync = parse_sqlite_url(url)
        self._queries = load_queries("sqlite")
        self._conn: sqlite3.Connection | None = None
        # Free: no yield, so a lone writer's transaction and its COMMIT run without one.
        self._lock = _ConnectionLock()
        self.write_wait = _WRITE_WAIT
        # Without an fsync a COMMIT is a write into the page cache: cheaper on the loop than the
        # thread hand-off (measured: ~55k hand-offs were half a 10-worker simulated month).
        self._commit_inline = self._sync == "NORMAL"
        self._on_loop = False  # see keep_on_loop
        self._threaded_until = 0.0  # perf_counter instant: COMMITs go to a thread until then
        self._commits = 0  # since the last checkpoint ended (the WAL's restart)
        self._commits_before = 0  # of those, the ones before the checkpoint in progress began
        self._checkpointer = _Checkpointer(self)
        self._checkpoint_every = _FIRST_CHECKPOINT_AFTER  # COMMITs; see _checkpoint
        self._frame_bytes = 4096 + 24  # a WAL frame: a page and its header (see connect)
        self._wal_path = ""
        self._wal_size = 0  # bytes, as lost() last saw the WAL's file (see _CHECKPOINT_BYTES)
        self._closing = False
        self._watched: dict[str, tuple[int, tuple[int, int]]] = {}
        self._lost: str | None = None
        self._readers: list[sqlite3.Connection] = []  # idle read-only connections
        self._batch: _Batch | None = None  # the write transaction open for group commit
        self._rollbacks = 0  # writes undone on this connection (see _SQLiteTx.change_stamp)

    @property
    def identity_path(self) -> Path:
        """Beside the database: the id of the store that lives here (see check_identity)."""
        return self.path.with_name(self.path.name + ".identity")

    @property
    def _migrate_new(self) -> str:
        # With --db: a simulation's store is not the configured one.
        return f"acp-supervisor --db {self.url.split('?')[0]} db migrate --new"

    def _recorded_identity(self) -> tuple[bool, str | None]:
        """(whether the identity file is there, the id it holds: None if absent or unreadable)."""
        try:
            fd = os.open(self.identity_path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return False, None
        except OSError:
            return True, None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return True, None
            text = os.read(fd, 200).decode("ascii", "replace").strip()
        except OSError:
            return True, None
        finally:
            os.close(fd)
        return True, text or None

    def _refuse_fresh_over_history(self) -> None:
        """A database file that is missing (or empty) where a store lived means it was deleted:
        starting afresh would forget every command_id and run their effects again."""
        try:
            fresh = self.path.stat().st_size == 0
        except FileNotFoundError:
            fresh = True
        except OSError as exc:
            raise StoreConfigError(
                f"cannot stat sqlite database {self.path}: {exc.strerror or exc}"
            ) from None
        # An empty file whose pages are all still in the WAL (committed, not yet checkpointed)
        # is not new; a missing file is, whatever WAL was left beside it.
        with contextlib.suppress(OSError):
            fresh = fresh and (not self.path.exists() or os.stat(f"{self.path}-wal").st_size == 0)
        if not fresh or self.allow_new:
            return
        exists, recorded = self._recorded_identity()
        if exists:
            raise StoreConfigError(
                f"sqlite database {self.path} is missing, but {self.identity_path} says store "
                f"{recorded or '(unreadable)'} lived there: refusing to start a new, empty "
                f"ledger; restore the database, or run `{self._migrate_new}` to begin a new store"
            )

    async def check_identity(self, identity: str | None) -> None:
        if identity is None:
            return
        exists, recorded = self._recorded_identity()
        if recorded == identity:
            return
        if exists and not self.allow_new:
            if recorded is None:
                return  # unreadable here (another user's file): nothing to compare, keep it
            raise StoreConfigError(
                f"sqlite database {self.path} is store {identity}, but {self.identity_path} "
                f"says store {recorded} lived there: the database was replaced; restore it, or "
                f"run `{self._migrate_new}` to adopt this one"
            )
        # Not secret, and readable by whichever user runs the CLI or the daemon next. In a
        # read-only directory the database still opens; only the protection is missing.
        with contextlib.suppress(OSError):
            atomic_write(self.identity_path, (identity + "\n").encode(), mode=0o644)

    def _watch_file(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            self._watched[str(path)] = (fd, (st.st_dev, st.st_ino))

    def lost(self, *, quick: bool = False) -> str | None:
        """Also the link count of our own descriptors unless `quick` (the per-commit check: a
        stat per file, since a path that still resolves to our inode means it is linked)."""
        for path, (fd, ident) in self._watched.items():
            if self._lost is not None:
                break
            try:
                st = os.stat(path)
                now = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                now = None
            except OSError:
                continue  # cannot tell; the commit itself reports real I/O trouble
            if path == self._wal_path:
                self._wal_size = st.st_size if now is not None else 0
            if now is not None and now != ident:
                self._lost = f"sqlite database file {path} was replaced by another file in use"
            elif now is None or (not quick and os.fstat(fd).st_nlink == 0):
                self._lost = f"sqlite database file {path} was deleted while in use"
        return self._lost

    async def connect(self) -> None:
        plain = self._plain_path()
        if not self.create and not self.path.exists():
            raise DatabaseMissing(f"database {plain} does not exist", plain)
        if not self.path.parent.is_dir():
            raise StoreConfigError(f"sqlite database directory {self.path.parent} does not exist")
        self._refuse_fresh_over_history()
        existed = self.path.exists()
        # busy_timeout 0: a statement on the event loop never waits for another process; the
        # places that may wait do so in a thread: BEGIN IMMEDIATE (see _begin) and this open,
        # whose first statements need a lock another process may hold for a moment (a CLI
        # reading while the WAL index is rebuilt after a crash, a migrate switching to WAL).
        # mode=rw: no file is created when it vanished since the check above (and `plain`:
        # a leading // would be a URI authority)
        target = self.path if self.create else f"file:{quote(plain)}?mode=rw"

        def open_connection() -> sqlite3.Connection:
            conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False,
                                   timeout=self.write_wait, uri=not self.create)  # fmt: skip
            try:
                if not existed:
                    # Before the WAL and shared-memory files exist: SQLite gives them the
                    # database file's mode. Owner only, whatever the umask.
                    os.chmod(self.path, 0o600)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self._sync}")
                conn.execute("PRAGMA wal_autocheckpoint=0")  # see _CHECKPOINT_BYTES
                # Cut back to the target when it restarts: a WAL file larger than that is one
                # whose checkpoint is overdue (see _commit_batch).
                conn.execute(f"PRAGMA journal_size_limit={_CHECKPOINT_BYTES}")
                conn.execute("PRAGMA foreign_keys=ON")
                _size_cache(conn)
                conn.execute("PRAGMA busy_timeout=0")
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await anyio.to_thread.run_sync(open_connection)
        except (sqlite3.Error, OSError) as exc:
            raise StoreConfigError(f"cannot open sqlite database {self.path}: {exc}") from exc
        self._conn = conn
        # Our own descriptors on the database and its WAL (where commits land first; a read
        # creates it), to tell a deleted or replaced file (link count 0, another inode at the
        # path) from the one the connection writes into. SQLite removes the WAL only when the
        # last connection closes, never under an open one.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        self._watch_file(self.path)
        self._wal_path = str(self.path.with_name(self.path.name + "-wal"))
        self._watch_file(Path(self._wal_path))
        with contextlib.suppress(sqlite3.Error):
            self._frame_bytes = int(conn.execute("PRAGMA page_size").fetchone()[0]) + 24

    def keep_on_loop(self) -> bool:
        self._on_loop = self._commit_inline = True
        return True

    async def close(self) -> None:
        self._closing = True  # no checkpoint starts from here on
        if self._checkpointer.running:  # its run ends first, off the loop
            await anyio.to_thread.run_sync(self._checkpointer.close)
        else:
            self._checkpointer.close()
        readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        watched, self._watched = self._watched, {}
        for fd, _ident in watched.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._conn is not None:
            async with self._idle_connection() as conn:
                self._conn = None
                conn.close()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE on the loop when the write lock is free (the usual case: no thread
        hop); when another process holds it, wait for it in a thread, up to write_wait."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise StateWriteError(f"sqlite cannot begin a write: {exc}") from exc

        def wait_for_lock() -> None:
            conn.execute(f"PRAGMA busy_timeout={int(self.write_wait * 1000)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.execute("PRAGMA busy_timeout=0")

        try:
            await anyio.to_thread.run_sync(wait_for_lock)
        except sqlite3.Error as exc:
            raise StateWriteError(f"sqlite cannot begin a write: {exc}") from exc

    def transaction(self) -> _Write:
        """Group commit. The batch's first member (its leader) opens the write transaction and
        runs its body in it; each later member's body runs in a SAVEPOINT of it. The leader
        then queues for the connection again and commits every body that ran meanwhile with
        one COMMIT (one fsync). Nobody leaves this block before the COMMIT holding their writes
        has returned; when it fails, every member fails closed. A lone writer queues behind
        nobody, so it commits at once. While a COMMIT waits for the disk, the next members
        queue for the connection: they form the next batch (SQLite holds its write lock
        through the fsync, so no write of theirs could run before it anyway)."""
        return _Write(self)

    @staticmethod
    async def _settled(batch: _Batch) -> None:
        """Wait for the COMMIT of `batch` (whatever cancels us: the outcome is learnt), and
        fail as it did."""
        if not batch.done.is_set():  # a leader alone committed already
            with anyio.CancelScope(shield=True):
                await batch.done.wait()
        if batch.error is not None:
            error = batch.error
            raise type(error)(*error.args) from error  # each member its own exception

    async def _lead(self, batch: _Batch) -> None:
        """Behind every body queued meanwhile (the lock is fair), commit the batch, unless a
        reader or a failure has settled it already. First every task that is ready runs: a
        write it is about to make joins this batch (with nothing else to wait on, as when
        COMMITs run on the loop, nobody would ever queue behind the leader)."""
        await anyio.lowlevel.checkpoint()  # shielded by the caller: never a cancellation
        async with self._lock:
            if self._batch is batch:
                await self._commit_batch()

    async def _commit_batch(self) -> None:
        """With the lock held: COMMIT the open batch and release its members."""
        conn = self._require()
        batch, self._batch = self._batch, None
        if batch is None:
            return
        lost = self.lost(quick=True)
        if lost is not None:
            # Committing into a deleted inode would "succeed" and be lost: fail closed.
            conn.execute("ROLLBACK")
            self._rollbacks += 1
            batch.settle(StoreLost(lost))
            return
        # A checkpointer syncing the database file makes a COMMIT's fsync wait for that one:
        # meanwhile COMMITs go to a thread, and their time says nothing of the disk.
        checkpointing = self._checkpointer.running
        inline = self._commit_inline or (
            batch.members == 1  # a lone writer, and nobody queued for the connection
            and not self._lock.waiting
            and not checkpointing
            and time.perf_counter() >= self._threaded_until
        )
        began = time.perf_counter()
        try:
            if inline:
                conn.execute("COMMIT")
            else:
                await anyio.to_thread.run_sync(conn.execute, "COMMIT")
            took = time.perf_counter() - began
            timed = batch.timed and not checkpointing
            if not self._commit_inline and timed and took > _INLINE_COMMIT_LIMIT:
                self._threaded_until = time.perf_counter() + _SLOW_DISK_PAUSE
            self._commits += 1
        except BaseException as exc:
            self._rollbacks += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            batch.settle(StateWriteError(f"sqlite commit failed: {exc}"))
            if not isinstance(exc, sqlite3.Error):
                raise
            return
        batch.settle(None)
        if self._closing:
            return
        checkpointer = self._checkpointer
        # Due after as many COMMITs as write about _CHECKPOINT_BYTES at the last rate, or
        # sooner when the WAL's file is half as large again: COMMITs grew (a busy fleet after
        # a quiet night) and the count would let the WAL grow by as much. (Ten COMMITs apart
        # at least: a reader's snapshot can keep a WAL from restarting for a while.)
        due = self._commits >= self._checkpoint_every or (
            self._wal_size > _CHECKPOINT_BYTES * 3 // 2 and self._commits >= 10
        )
        if self._on_loop:
            if due:
                self._checkpoint_on_loop(conn)
        elif checkpointer.done:
            await self._checkpoint(conn)
        elif due and not checkpointer.running:
            self._commits_before = self._commits  # their frames are what it will count
            checkpointer.start()

    async def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """With the lock held, in a thread: the second half of a checkpoint, once the
        checkpointer copied the bulk of the WAL beside the writes (see _Checkpointer). What
        was written meanwhile is copied here, and with no writer in between the WAL restarts
        at the next write (else it would only grow). The first half's frame count says when
        the next one is due (_checkpoint_due: SQLite tells frames only there)."""
        self._checkpoint_due(self._checkpointer.consume())
        self._commits = 0  # the WAL restarts at the next write
        try:
            await anyio.to_thread.run_sync(_wal_checkpoint, conn)
        except sqlite3.Error as exc:  # the writes are committed; the WAL only stays longer
            log.warning("store.checkpoint_failed", error=str(exc))

    def _checkpoint_on_loop(self, conn: sqlite3.Connection) -> None:
        """keep_on_loop's checkpoint: all of it, here (nothing writes meanwhile)."""
        self._commits_before, self._commits = self._commits, 0
        try:
            frames = _wal_checkpoint(conn)
        except sqlite3.Error as exc:
            log.warning("store.checkpoint_failed", error=str(exc))
            return
        self._checkpoint_due(frames)

    def _checkpoint_due(self, frames: int) -> None:
        """The next checkpoint after as many COMMITs as write about _CHECKPOINT_BYTES at the
        rate the WAL's `frames` (since the last one) tell."""
        if frames > 0:  # -1: another connection's checkpoint was running; nothing learnt
            per_commit = frames * self._frame_bytes / max(self._commits_before, 1)
            every = int(_CHECKPOINT_BYTES / per_commit)
            self._checkpoint_every = min(max(every, 10), _CHECKPOINT_AFTER_AT_MOST)

    def _drop_ended_batch(self, conn: sqlite3.Connection) -> None:
        """With the lock held: when a statement failed and SQLite ended the open batch's
        transaction itself (an I/O error, a full disk), its writes are gone and nothing holds
        the write lock. The batch fails at once (a rollback, for the switch cache's stamp)."""
        if self._batch is not None and not conn.in_transaction:
            self._rollbacks += 1
            self._fail_batch(_ended())

    def _fail_batch(self, error: Exception) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.settle(error)

    @asynccontextmanager
    async def _idle_connection(self) -> AsyncIterator[sqlite3.Connection]:
        """The connection with no batch open: reads on it see committed rows only."""
        conn = self._require()
        async with self._lock:
            if self._batch is not None:
                with anyio.CancelScope(shield=True):
                    await self._commit_batch()
            yield conn

    def reader(self) -> _Read:
        """Reads on the loop's connection. With a batch open they run inside it, so they may
        see its writes before they are durable: the block's result is only let go once that
        batch's COMMIT has returned (and fails if it failed). Reading does not commit the
        batch early: a read between writes would cut every batch short."""
        return _Read(self)

    def _open_checkpointer(self) -> sqlite3.Connection:
        """The checkpointer's connection (in its thread). mode=rw: a file deleted meanwhile is
        not created again."""
        conn = sqlite3.connect(f"file:{quote(self._plain_path())}?mode=rw", uri=True, timeout=0,
                               isolation_level=None, check_same_thread=False)  # fmt: skip
        conn.execute(f"PRAGMA synchronous={self._sync}")
        return conn

    def _plain_path(self) -> str:
        plain = str(self.path)
        return "/" + plain.lstrip("/") if plain.startswith("//") else plain  # as a person types it

    def _open_reader(self) -> sqlite3.Connection:
        """A read-only connection (in a worker thread: opening reads the file)."""
        plain = self._plain_path()
        try:
            # It waits for a busy database in its thread (the loop is not waiting on it).
            conn = sqlite3.connect(f"file:{quote(plain)}?mode=ro", uri=True, timeout=_READ_WAIT,
                                   isolation_level=None, check_same_thread=False)  # fmt: skip
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            _size_cache(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite cannot open a reader on {self.path}: {exc}") from exc
        return conn

    def _read_in_thread(
        self, conn: sqlite3.Connection | None, reads: Reads, then: Callable[[list[list[Row]]], T]
    ) -> tuple[sqlite3.Connection, T]:
        conn = conn or self._open_reader()
        results: list[list[Row]] = []
        name = "begin"
        try:
            conn.execute("BEGIN")  # one snapshot for every read of the batch
            try:
                for name, args in reads:
                    cursor = conn.execute(self._queries[name], _encoded(args))
                    decode = _decoder(cursor)  # rows decoded as they come, not all held twice
                    results.append([decode(r) for r in cursor])
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"sqlite {name}: {exc}") from exc
        try:
            return conn, then(results)
        except BaseException:
            conn.close()
            raise

    async def read_off_loop(self, reads: Reads, then: Callable[[list[list[Row]]], T]) -> T:
        """The reads and `then` in a worker thread, on an idle read-only connection (a new one
        when none is idle), so scans run side by side and beside the loop's writes."""
        self._require()
        lost = self.lost(quick=True)
        if lost is not None:
            raise StoreLost(lost)  # a path that names another file now: do not read that one
        idle = self._readers.pop() if self._readers else None
        if self._on_loop:
            conn, result = self._read_in_thread(idle, reads, then)
        else:
            # Not abandoned on cancellation: the connection is in use until the thread returns.
            conn, result = await anyio.to_thread.run_sync(self._read_in_thread, idle, reads, then)
        if self._conn is not None and len(self._readers) < _IDLE_READERS:
            self._readers.append(conn)
        else:
            conn.close()  # closed meanwhile, or enough idle ones
        return result

    async def schema_versions(self) -> list[int] | None:
        async with self._idle_connection() as conn:
            try:
                exists = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
                ).fetchone()
                if not exists:
                    return None
                rows = conn.execute(self._queries["schema_versions"]).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite cannot read the schema version: {exc}") from exc
        return [int(r["version"]) for r in rows]

    async def apply_migration(self, version: int, statements: list[str], now: datetime) -> bool:
        async with self.transaction() as tx:
            conn = self._require()
            if self._batch is not None:
                self._batch.timed = False  # DDL on a new file: slow once, says nothing
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if (
                has_table
                and conn.execute(
                    "SELECT 1 FROM schema_version WHERE version = ?", (version,)
                ).fetchone()
            ):
                return False
            for statement in statements:
                try:
                    conn.execute(statement)
                except sqlite3.Error as exc:
                    raise StateWriteError(f"migration {version}: {exc}") from exc
            await tx.execute("record_version", version, now)
        return True


class _Checkpointer:
    """The first half of each checkpoint: the WAL copied into the database file (and, but for
    synchronous=off, that file synced) on a connection and a thread of its own, while the
    store's connection goes on committing. On a store of a million events a whole checkpoint
    took about 50 ms, with every writer waiting behind the lock it held."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._frames = 0  # the WAL's frames when the last run began (0: unknown)
        self.done = False  # a run ended that the store has not followed up yet

    @property
    def running(self) -> bool:
        return self._thread is not None and not self.done

    def start(self) -> None:
        """Called after a COMMIT its members were told of: it raises nothing (no thread to be
        had, say: the checkpoint waits for the next COMMIT)."""
        self.done = False
        thread = threading.Thread(target=self._run, name="acp-sqlite-checkpoint", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            log.warning("store.checkpoint_failed", error=str(exc))
            return
        self._thread = thread

    def consume(self) -> int:
        """The run's frame count, and the next run may start."""
        self.done, self._thread = False, None
        return self._frames

    def _run(self) -> None:
        self._frames = 0
        try:
            backend = self._backend
            watched = backend._watched.get(str(backend.path))
            if watched is None:
                return  # the store closed meanwhile
            fd, ident = watched
            if self._conn is None:
                # Opened by name: only while the name is still our database's (a file put in
                # its place would be handed our WAL's pages; the store fails closed on it).
                st = os.stat(backend.path)
                if (st.st_dev, st.st_ino) != ident:
                    raise OSError(f"{backend.path} is no longer the store's database file")
                self._conn = backend._open_checkpointer()
            self._frames = _wal_checkpoint(self._conn)
            if backend._sync != "OFF":
                # SQLite syncs the database file only at the end of a checkpoint that copied
                # the whole WAL, which with writes going on is never this one: the store's own
                # follow-up would then sync every page copied here, holding the lock (60-75 ms
                # on a store of a million events). Synced here (our own descriptor of the file),
                # it has only its own pages to sync.
                os.fsync(fd)
        except (sqlite3.Error, OSError) as exc:  # the writes are committed; the WAL stays longer
            log.warning("store.checkpoint_failed", error=str(exc))
        finally:
            self.done = True

    def close(self) -> None:
        """Blocking (in a thread): the run in progress ends first."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.done = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _ended() -> StateWriteError:
    return StateWriteError("sqlite rolled back a batch of writes")


class _Write:
    """SQLiteBackend.transaction: a class, not a generator (one per write; see _Read)."""

    __slots__ = ("_backend", "_batch", "_leader")

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend
        self._batch: _Batch | None = None
        self._leader = False

    async def __aenter__(self) -> _SQLiteTx:
        backend = self._backend
        conn = backend._require()
        await backend._lock.acquire()
        try:
            backend._drop_ended_batch(conn)  # never join a batch SQLite ended
            if backend._batch is None:
                await backend._begin(conn)
                backend._batch, self._leader = _Batch(), True
            batch = self._batch = backend._batch
            batch.members += 1
            if not self._leader:  # the leader's body is the transaction's start: no savepoint
                conn.execute("SAVEPOINT tx")
        except BaseException:
            backend._lock.release()
            raise
        return _SQLiteTx(
            conn, backend._queries, write=True, rollbacks=backend._rollbacks, batch=batch
        )

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        backend, batch = self._backend, self._batch
        assert batch is not None
        conn = backend._require()
        try:
            if exc is not None:
                backend._rollbacks += 1
                if not conn.in_transaction:  # SQLite rolled the batch back (I/O, full disk)
                    backend._fail_batch(_ended())
                elif self._leader:  # nobody else is in the batch yet (the lock is still ours)
                    conn.execute("ROLLBACK")
                    backend._fail_batch(StateWriteError("the batch's first body failed"))
                else:
                    conn.execute("ROLLBACK TO tx")
                    conn.execute("RELEASE tx")
            elif not self._leader:
                conn.execute("RELEASE tx")
        finally:
            backend._lock.release()
            if self._leader:
                with anyio.CancelScope(shield=True):
                    await backend._lead(batch)
        if exc is None:
            await backend._settled(batch)


class _Read:
    """SQLiteBackend.reader. A class, not an asynccontextmanager: several per governed action,
    and the generator's frames and wrappers cost more than the reads they wrap."""

    __slots__ = ("_backend", "_batch")

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend
        self._batch: _Batch | None = None

    async def __aenter__(self) -> _SQLiteTx:
        backend = self._backend
        conn = backend._require()
        await backend._lock.acquire()
        self._batch = backend._batch
        return _SQLiteTx(
            conn, backend._queries, write=False, rollbacks=backend._rollbacks, batch=self._batch
        )

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        backend = self._backend
        if backend._conn is not None:
            backend._drop_ended_batch(backend._conn)  # a statement here may have ended it
        backend._lock.release()
        if self._batch is not None and exc is None:
            await backend._settled(self._batch)
