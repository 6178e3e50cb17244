"""Simulated runs, each in a folder of its own under <state>/simulations/<run id>/.

A simulated run governs windows in simulated time; two runs over the same hours would claim the
same windows (their command_ids are deterministic), so each `run --simulate` gets its own
database unless `--db` names one. The run id sorts by the time it was made (a UTC timestamp,
to the millisecond, then the seed and a short random part). `run.json` beside the database holds the parameters, so
the same command after a kill resumes its unfinished run instead of starting a new one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli.tables import resolve_prefix
from .errors import DatabaseMissing, NotFound, UsageError
from .statedir import atomic_write
from .timing.clock import SystemClock

if TYPE_CHECKING:
    from .config import Config
    from .store import Store

FOLDER = "simulations"
DB_FILE = "simulate.db"
META_FILE = "run.json"


def simulations_dir(state_dir: Path) -> Path:
    return state_dir / FOLDER


@dataclass(frozen=True, slots=True)
class SimRun:
    id: str
    path: Path
    meta: dict[str, Any]

    @property
    def db_path(self) -> Path:
        return self.path / DB_FILE

    @property
    def db_url(self) -> str:
        # Durable against a killed process (WAL, synchronous=normal: what the crash tests
        # exercise); power-loss durability (synchronous=full) is for real fleets.
        return f"sqlite:///{self.db_path}?synchronous=normal"

    @property
    def finished(self) -> bool:
        return bool(self.meta.get("finished_at"))


def _read(path: Path) -> SimRun | None:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return SimRun(path.name, path, meta) if isinstance(meta, dict) else None


def list_runs(state_dir: Path) -> list[SimRun]:
    """Every simulated run in the state directory, oldest first."""
    folder = simulations_dir(state_dir)
    if not folder.is_dir():
        return []
    runs = [run for entry in folder.iterdir() if entry.is_dir() and (run := _read(entry))]
    return sorted(runs, key=lambda r: (str(r.meta.get("created_at", "")), r.id))


def _params(horizon: str, start: datetime | None, seed: int, config: Path | None) -> dict[str, Any]:
    return {"horizon": horizon, "start": start.isoformat() if start else None, "seed": seed,
            "config": str(config.absolute()) if config else None}  # fmt: skip


def begin(
    state_dir: Path,
    *,
    horizon: str,
    start: datetime | None,
    seed: int,
    config: Path | None,
    now: datetime,
) -> tuple[SimRun, bool]:
    """The run to use and whether it resumes: the latest unfinished run with the same parameters
    (a run killed part way), else a new folder."""
    params = _params(horizon, start, seed, config)
    runs = list_runs(state_dir)
    if runs and not runs[-1].finished and all(runs[-1].meta.get(k) == v for k, v in params.items()):
        return runs[-1], True
    stamp = now.astimezone(UTC)
    run_id = (
        f"{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond // 1000:03d}Z-s{seed}-{secrets.token_hex(2)}"
    )
    path = simulations_dir(state_dir) / run_id
    path.mkdir(parents=True)
    meta = {"id": run_id, "created_at": stamp.isoformat(timespec="microseconds"), **params,
            "finished_at": None}  # fmt: skip
    _write(path, meta)
    return SimRun(run_id, path, meta), False


def finish(run: SimRun, now: datetime, clock: datetime | None = None) -> None:
    """Mark the run done; `clock` is the simulated clock at its end, the "now" its ages are read
    against (see `clock_at_end`)."""
    meta = {**run.meta, "finished_at": now.astimezone(UTC).isoformat()}
    if clock is not None:
        meta["clock_end"] = clock.astimezone(UTC).isoformat()
    _write(run.path, meta)


def clock_at_end(db_url: str) -> datetime | None:
    """The simulated clock at the end of the run whose database `db_url` names, if it is one.

    Its times lie in simulated time, hours or months away from the wall clock: ages shown
    against the wall clock would read `in 22h` for a checkpoint of its past.
    """
    if not db_url.startswith("sqlite:///"):
        return None
    path = Path(db_url.removeprefix("sqlite:///").split("?", 1)[0])
    if path.name != DB_FILE:
        return None
    run = _read(path.parent)
    stamp = run.meta.get("clock_end") if run else None
    try:
        return datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None


def _write(path: Path, meta: dict[str, Any]) -> None:
    body = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    atomic_write(path / META_FILE, body.encode("utf-8"), mode=0o644)


def find(state_dir: Path, ref: str) -> SimRun:
    """`latest`, a run id, or a unique prefix of one (6+ characters)."""
    runs = list_runs(state_dir)
    where = simulations_dir(state_dir)
    if not runs:
        raise NotFound(f"no simulated runs under {where}")
    if ref == "latest":
        return runs[-1]
    if not ref.strip():
        raise UsageError("--run needs a run id or 'latest'")
    chosen = resolve_prefix((r.id for r in runs), ref, "run")
    if chosen is None:
        raise NotFound(f"no simulated run {ref!r} under {where} (latest: {runs[-1].id})")
    return next(r for r in runs if r.id == chosen)


async def open_fleet_store(config: Config) -> Store:
    """The fleet's store for a command (never migrated here); a missing database says where
    the simulated runs are."""
    from .store import open_store

    try:
        return await open_store(config.db_url, SystemClock())
    except DatabaseMissing as exc:
        raise DatabaseMissing(
            f"{exc}; simulated runs are kept under {simulations_dir(config.state_dir)} "
            "(read one with --run ID|latest); `acp-supervisor db migrate` creates a fleet's database",
            exc.path,
        ) from None
