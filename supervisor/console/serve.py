"""Serving the console with uvicorn: as its own process (`acp-supervisor console`) or as one
task of the daemon's task group (`[console] enabled = true`).

The socket is bound here, before uvicorn starts, so an address in use is one clear error line
rather than uvicorn's exit; the store is opened here too, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from ..config import Config
from ..errors import ConfigError, UsageError
from ..store import Store, open_store
from ..timing.clock import SystemClock
from .settings import parse_listen

log = structlog.get_logger("supervisor.console")

EXTRA_HINT = "the console needs its extra: pip install 'acp-supervisor[console]'"


def require_extra() -> None:
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{EXTRA_HINT} ({exc.name} is missing)") from None


def bind(listen: str) -> socket.socket:
    host, port = parse_listen(listen, "--listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"console cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.listen(128)  # not inheritable (Python's default): no child, governed or not, holds it
    return sock


def _tls(config: Config) -> tuple[str | None, str | None]:
    cert, key = config.console.tls_cert, config.console.tls_key
    for path in (cert, key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"console TLS file {path} does not exist")
    return cert, key


async def serve(
    config: Config,
    listen: str | None = None,
    *,
    store: Store | None = None,
    embedded: bool = False,
    stop: threading.Event | None = None,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (its own process), or until cancelled or `stop` is set
    (embedded). Reports the URL it serves on to `task_status`."""
    require_extra()
    import uvicorn

    from .app import create_app

    cert, key = _tls(config)
    sock = bind(listen or config.console.listen)
    own_store = store is None
    if store is None:
        try:
            store = await open_store(config.db_url, SystemClock())
        except BaseException:
            sock.close()
            raise
    app = create_app(config, store)
    uv_config = uvicorn.Config(app, log_config=None, access_log=False, proxy_headers=True,
                               ssl_certfile=cert, ssl_keyfile=key, lifespan="on",
                               timeout_graceful_shutdown=3)  # fmt: skip

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if embedded:  # the daemon owns the signals; cancellation stops us
                yield
                return
            with super().capture_signals():
                yield

    server = _Server(uv_config)
    host, port = sock.getsockname()[:2]
    url = f"{'https' if cert else 'http'}://{host if ':' not in host else f'[{host}]'}:{port}"
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                if server.should_exit:
                    break
                await anyio.sleep(0.02)
            log.info("console.serving", url=url, operators=str(
                config.console.operators_path(config.state_dir)))  # fmt: skip
            task_status.started(url)
            while stop is not None and not server.should_exit:
                if stop.is_set():
                    server.should_exit = True
                await anyio.sleep(0.05)
    finally:
        sock.close()
        if own_store:
            with anyio.CancelScope(shield=True):
                await store.close()


async def serve_beside(config: Config) -> None:
    """The daemon's console: uvicorn on an event loop of its own, in a thread of its own, with
    its own store connection. A page's reads (on SQLite they run on the loop that asks) and a
    login's scrypt never hold up the daemon's loop, where the gate runs. Returns when the
    console stops; cancelled, it stops the console and waits a few seconds for it."""
    stop = threading.Event()

    def run() -> None:
        asyncio.run(serve(config, embedded=True, stop=stop))

    try:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    finally:
        stop.set()
