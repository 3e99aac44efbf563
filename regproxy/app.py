"""Wiring: build the aiohttp application from a config, and the ``serve`` coroutine.

``serve`` is what both ``regproxy serve`` and the tests run. Resources live in ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from aiohttp import web

from regproxy import admin, api, auth, repo_sizes, ui
from regproxy.access import AccessLogger
from regproxy.async_index import AsyncIndex
from regproxy.config import Config
from regproxy.connections import ConnectionGuard, server_logger
from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.errors import ConfigError
from regproxy.evict import Evictor
from regproxy.expect import close_if_body_refused
from regproxy.fastpath import FastPath
from regproxy.fd_limits import default_max_connections, raise_nofile_limit
from regproxy.headers import INSTANCE_HEADER
from regproxy.health import Health
from regproxy.lane import Streams
from regproxy.log import flush_lines
from regproxy.lookups import TAG_CONFIRM_SECONDS
from regproxy.maintenance import OrphanSweeper
from regproxy.malloc_arenas import cap_arenas
from regproxy.metrics import Metrics
from regproxy.names import NameResolver
from regproxy.peers import Peers
from regproxy.policy import Policy
from regproxy.prefetch import Prefetcher
from regproxy.proxy import ProxyRegistry, build_registry
from regproxy.request_limits import HTTP_KEY, TIMING_KEY
from regproxy.tls import ServerTLS
from regproxy.tls import reload_all as reload_tls
from regproxy.tls_failures import HandshakeFailures
from regproxy.tls_loop import LoopTLS
from regproxy.tls_relay import PAIR_FDS, TLSRelay
from regproxy.web_errors import error_middleware
from regproxy.web_keys import (
    CONFIG_KEY,
    HEALTH_KEY,
    INSTANCE_KEY,
    METRICS_KEY,
    POLICY_KEY,
    PREFETCH_KEY,
    REGISTRY_KEY,
    RESOLVER_KEY,
)

#: the fast lane's blob bodies going (regproxy.lane.Streams)
STREAMS_KEY: Final = web.AppKey("lane_streams", Streams)
log = logging.getLogger("regproxy")
HOUSEKEEPING_SECONDS: Final = 10.0
_BACKGROUND: set[asyncio.Task[None]] = set()


async def _housekeeping(app: web.Application) -> None:
    registry = app[REGISTRY_KEY]
    config = app[CONFIG_KEY]
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        try:
            await registry.flush_access()
            await registry.uploads.expire(config.storage.upload_ttl)
        except Exception:
            log.exception("housekeeping.failed")


async def count_sizes(db: AsyncIndex, *, unclaim: bool = True) -> None:
    """Count every repository's size the index does not keep (new, changed, or a store just
    upgraded), :data:`repo_sizes.CLAIM` at a time: each walk on a reader, the writer only
    marks them and keeps the counts (regproxy.repo_sizes). ``unclaim``: first forget the marks
    a count that did not end left."""
    if unclaim:
        await db.write_background(repo_sizes.unclaim)
    while names := await db.write_background(repo_sizes.claim):
        # one repository a read: a reader (the pulls' lookups use them too) is held for one
        # walk at most (~0.4 s for 5,000 manifests), never for a batch of them
        sizes = [size for name in names for size in await db.read(repo_sizes.measure, [name])]
        await db.write_background(repo_sizes.keep, sizes)
        await asyncio.sleep(0.1)  # the readers' other work (the pages) goes between batches


async def _count_sizes(app: web.Application) -> None:
    """:func:`count_sizes` in the background, every :data:`HOUSEKEEPING_SECONDS`."""
    registry = app[REGISTRY_KEY]
    logged = float("-inf")
    ended = False  # whether the last count ended (else it may have left marks)
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        try:
            await count_sizes(registry.db, unclaim=not ended)
            ended = True
        except Exception as exc:
            ended = False
            # the page counts what is not kept itself: slower, never wrong (once a minute)
            now = asyncio.get_running_loop().time()
            if now - logged >= 60.0:
                logged = now
                log.warning("sizes.count_failed error=%r", exc)


async def _confirm_lookups(app: web.Application) -> None:
    """Keep the cached tags believed while no other process changes the index (lookups)."""
    registry = app[REGISTRY_KEY]
    logged = float("-inf")
    while True:
        await asyncio.sleep(TAG_CONFIRM_SECONDS)
        try:
            await registry.confirm_lookups()
        except Exception as exc:
            # tags then expire a second after their read, as without confirmations; said
            # once a minute at most (this runs twice a second)
            now = asyncio.get_running_loop().time()
            if now - logged >= 60.0:
                logged = now
                log.warning("lookups.confirm_failed error=%r", exc)


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    registry = app[REGISTRY_KEY]
    await registry.open()
    # the first check starts the confirmations: before the first request, and before the
    # first eviction batch can delay it (a tag looked up before it would go stale a second on)
    await registry.confirm_lookups()
    if isinstance(registry, ProxyRegistry):
        peers = Peers(
            app[CONFIG_KEY], app[INSTANCE_KEY], timing=registry.timing, metrics=registry.metrics
        )
        registry.attach_peers(peers)
        await peers.start()
    tasks = [
        asyncio.create_task(_housekeeping(app)),
        asyncio.create_task(_confirm_lookups(app)),
        asyncio.create_task(_count_sizes(app)),
    ]
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await registry.close()


async def _begin_shutdown(app: web.Application) -> None:
    """Shutdown starts: in-flight transfers drain within shutdown_timeout from now."""
    registry = app[REGISTRY_KEY]
    if isinstance(registry, ProxyRegistry):
        registry.begin_shutdown()


async def _flush_access_lines(app: web.Application) -> None:
    """The access lines that wait for the log's writer thread are written (regproxy.log)."""
    flush_lines()


async def _evict_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep the store under storage.max_size and above min_free (regproxy.evict)."""
    reg, storage = app[REGISTRY_KEY], app[CONFIG_KEY].storage
    evictor = Evictor(reg, app[CONFIG_KEY])
    evictor.start()
    # and take back the files a crash left between an eviction's rows and its files
    sweeper = OrphanSweeper(reg.store, reg.db, storage.orphan_sweep_interval)
    sweeper.start()
    yield
    await sweeper.stop()
    await evictor.stop()


async def _prefetch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Prefetch in the background, after the registry opened, until shutdown."""
    task = asyncio.create_task(app[PREFETCH_KEY].run(), name="prefetch")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def index_page(request: web.Request) -> web.Response:
    """``/`` is the web page (regproxy.ui); ``/v2/`` is the registry."""
    raise web.HTTPFound(ui.PREFIX + "/")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the store takes writes, the index answers and the listener is up (health.py)."""
    extra = {}
    if request.app[CONFIG_KEY].prefetch.required_for_ready:
        extra["prefetch_done"] = request.app[PREFETCH_KEY].prefetch_done
    status, body = await request.app[HEALTH_KEY].check(extra)
    return web.json_response(body, status=status)


async def metrics_page(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def _instance_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[INSTANCE_HEADER] = request.app[INSTANCE_KEY]


def _access_logger(config: Config) -> logging.Logger:
    logger = logging.getLogger("regproxy.access")
    logger.setLevel(logging.INFO if config.log.access else logging.WARNING)
    return logger


def create_app(
    config: Config, *, timing: Timing = DEFAULT_TIMING, metrics: Metrics | None = None
) -> web.Application:
    """The application; ``timing`` is where its clocks come from (tests move a fake one), and
    ``metrics`` its metrics, on a CollectorRegistry of their own (a fresh one by default)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=8 * 1024 * 1024)
    app[CONFIG_KEY] = config
    app[HTTP_KEY] = config.http
    app[TIMING_KEY] = timing
    app[INSTANCE_KEY] = uuid.uuid4().hex
    app[METRICS_KEY] = metrics = metrics if metrics is not None else Metrics()
    app[STREAMS_KEY] = Streams()  # blob bodies the fast lane streams (a stop waits for them)
    registry = build_registry(config, timing=timing, metrics=metrics)
    app[REGISTRY_KEY] = registry
    app[POLICY_KEY] = Policy(registry)  # the signature policy, checked before manifests are served
    app[RESOLVER_KEY] = NameResolver(config)
    app.cleanup_ctx.append(_registry_ctx)
    app.cleanup_ctx.append(_evict_ctx)  # stops before the registry closes
    auth.setup(app, config.auth)  # after error_middleware: refusals are OCI errors
    try:
        app[PREFETCH_KEY] = Prefetcher(app[REGISTRY_KEY], app[RESOLVER_KEY], config.prefetch)
    except ValueError as exc:
        raise ConfigError("prefetch.platforms", str(exc)) from None
    app.cleanup_ctx.append(_prefetch_ctx)
    api.add_routes(app)
    admin.add_routes(app)
    app.on_response_prepare.append(_instance_header)
    app.on_response_prepare.append(close_if_body_refused)  # 100-continue never sent: closes
    app.router.add_get("/", index_page)
    app.router.add_get("/healthz", healthz)
    app[HEALTH_KEY] = Health(app[REGISTRY_KEY], config)
    app.cleanup_ctx.append(app[HEALTH_KEY].lifespan)
    # the web page at /ui (sessions for auth's rules)
    ui.setup(app, config, app[HEALTH_KEY], instance=app[INSTANCE_KEY], prefetch=app[PREFETCH_KEY])
    app.on_shutdown.append(app[HEALTH_KEY].on_shutdown)
    app.on_shutdown.append(_begin_shutdown)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.on_cleanup.append(_flush_access_lines)
    return app


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    """Kept for callers; ``serve`` holds a :class:`ServerTLS` so SIGHUP can reload it."""
    server_tls = ServerTLS.from_config(config.tls)
    return server_tls.context if server_tls else None


async def open_listener(
    runner: web.AppRunner,
    config: Config,
    host: str,
    port: int,
    max_connections: int,
    server_tls: ServerTLS | None = None,
) -> asyncio.Server | TLSRelay | LoopTLS:
    """The listener for a set-up runner of :func:`create_app`'s app (``serve``'s, and the
    in-process tests'). It is ours, not a web.TCPSite: each connection goes through the guard
    (regproxy.connections), which hands it on to aiohttp's protocol for it, with the fast lane
    (regproxy.fastpath) in front when ``http.fast_path`` is on. With TLS, worker threads do
    the handshakes and the encryption (regproxy.tls_relay) unless ``tls.workers`` is 0: then
    the event loop does, on connections it accepts itself (regproxy.tls_loop)."""
    assert runner.server is not None
    app = runner.app
    fast = FastPath.of(app) if config.http.fast_path else None
    guard = ConnectionGuard(
        runner.server,
        config.http,
        max_connections,
        app[METRICS_KEY],
        fast,
        streams=app[STREAMS_KEY],
    )
    workers = tls_workers(config)
    failures = HandshakeFailures(app[METRICS_KEY].tls_handshake_failures)
    if server_tls is not None and workers == 0:
        loop_tls = LoopTLS(
            lambda: server_tls.context,
            guard,
            handshake_timeout=config.http.header_timeout,
            on_handshake_failed=failures.failed,
        )
        loop_tls.listen(host, port, backlog=1024)
        return loop_tls
    if server_tls is not None:
        server_tls.swap = True  # the workers read server_tls.context: SIGHUP replaces it
        relay = TLSRelay(
            lambda: server_tls.context,
            guard,
            workers=workers,
            handshake_timeout=config.http.header_timeout,
            write_timeout=config.http.write_timeout,
            on_write_cut=app[METRICS_KEY].slow_clients_cut.labels("write").inc,
            on_handshake_failed=failures.failed,
        )
        try:
            relay.listen(host, port, backlog=1024)
        except BaseException:
            relay.stop()
            raise
        return relay
    return await asyncio.get_running_loop().create_server(
        guard, host, port, backlog=1024, reuse_address=True
    )


#: up to this many CPUs the event loop does TLS itself by default: measured on 2 cores, with
#: the clients on the same host (as containerd is), worker threads served 1 MiB blobs no faster
#: (0.91-1.03x) for 5-25% more CPU per GiB (the copies through the socket pair)
TLS_IN_LOOP_CPUS: Final = 2


def tls_workers(config: Config, cpus: int | None = None) -> int:
    """``tls.workers``; by default none on a host of up to :data:`TLS_IN_LOOP_CPUS` CPUs,
    else one thread per CPU this process may use, at most 8."""
    if config.tls.workers is not None:
        return config.tls.workers
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return 0 if cpus <= TLS_IN_LOOP_CPUS else min(8, cpus)


async def serve(
    config: Config,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], Awaitable[None] | None] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when run from the CLI), then shut down."""
    stop = stop or asyncio.Event()
    arenas = cap_arenas()  # before the threads start: see regproxy.malloc_arenas
    nofile = raise_nofile_limit()
    relayed = config.tls.enabled and tls_workers(config) > 0
    max_connections = config.http.max_connections or default_max_connections(
        nofile, PAIR_FDS if relayed else 0
    )
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        # always given: the access logger also keeps the request metrics; log.access only
        # decides whether it writes lines
        access_log=_access_logger(config),
        shutdown_timeout=config.shutdown_timeout,
        keepalive_timeout=config.http.keepalive_timeout,
        logger=server_logger(),  # a request it cannot parse is the client's fault: one line
        handle_signals=False,
    )
    await runner.setup()
    server_tls = ServerTLS.from_config(config.tls)  # referenced while serving: SIGHUP reloads it
    try:
        listener = await open_listener(
            runner, config, config.listen_host, config.listen_port, max_connections, server_tls
        )
    except BaseException:
        await runner.cleanup()
        raise
    port = listener.sockets[0].getsockname()[1] if listener.sockets else config.listen_port
    log.info(
        "listening address=%s:%d tls=%s tls_workers=%d sync=%s store=%s",
        config.listen_host,
        port,
        config.tls.enabled,
        tls_workers(config) if config.tls.enabled else 0,
        config.sync_enable,
        config.storage.root,
    )
    log.info(
        "limits nofile=%d max_connections=%d header_timeout=%.0fs keepalive_timeout=%.0fs "
        "write_timeout=%.0fs read_timeout=%.0fs max_upload_sessions=%d",
        nofile,
        max_connections,
        config.http.header_timeout,
        config.http.keepalive_timeout,
        config.http.write_timeout,
        config.http.read_timeout,
        config.uploads.max_sessions,
    )
    # Everything made so far (modules, the app, its routes and config) lives as long as the
    # process: out of the garbage collector's sight, each full collection scans half as many
    # objects. Measured with 10,000 manifests' lookups warmed: 20-29 ms instead of 72-79 ms, a
    # pause of the event loop and every thread (the likely cause of a 129 ms /readyz during an
    # eviction at full scale)
    gc.freeze()
    log.info("startup.gc_frozen objects=%d", gc.get_freeze_count())
    log.info("startup.malloc_arenas max=%s", arenas if arenas is not None else "unchanged")
    if on_ready is not None:
        result = on_ready(port)
        if asyncio.iscoroutine(result):
            await result
    try:
        await stop.wait()
    finally:
        await stop_serving(runner, listener, config.shutdown_timeout)
        log.info("shutdown.done")


#: what aiohttp's handlers are given at least when a stop has no time left (0 is no limit)
_LEAST_WAIT: Final = 0.001


async def stop_serving(
    runner: web.AppRunner, listener: asyncio.Server | TLSRelay | LoopTLS, within: float
) -> None:
    """Stop :func:`open_listener`'s listener and its runner in stages, all within one deadline
    ``within`` seconds from now (``shutdown_timeout``), each stage given what is left of it:

    1. no new connections; the app's ``on_shutdown`` (``/readyz`` says draining, in-flight
       transfers count their time from now: ``ProxyRegistry.begin_shutdown``);
    2. the bodies the fast lane streams (aiohttp sees their connections idle, and would close
       them at once);
    3. aiohttp's handlers (``Server.shutdown``), then the app's cleanup (the fetches in flight
       drain within what is left: ``ProxyRegistry.close``).

    aiohttp's runner would give its handlers the whole ``shutdown_timeout`` again after the
    bodies had used it (a stop took up to twice it): stage 3 is done here, with the time left,
    and the runner's own cleanup finds no connection left (its ``on_shutdown`` again: each
    hook does its work once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    log.info("shutdown.start timeout=%.0fs", within)
    listener.close()  # no new connections
    await runner.shutdown()
    streams = runner.app[STREAMS_KEY]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await streams.drained()
    server = runner.server
    if server is not None:
        left = max(0.0, deadline - loop.time())
        log.info("shutdown.handlers bodies_cut=%d timeout=%.1fs", len(streams.live), left)
        server.pre_shutdown()  # idle connections close
        # (aiohttp reads a timeout of 0 as none: it would wait for its handlers for ever)
        await server.shutdown(max(left, _LEAST_WAIT))
    await runner.cleanup()
    if isinstance(listener, TLSRelay):
        listener.stop()  # what is still relayed is aborted; the threads end


def install_signal_handlers(
    stop: asyncio.Event, reload: Callable[[], object] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (systemctl reload) reloads the TLS certificate; it never kills the daemon
    loop.add_signal_handler(signal.SIGHUP, reload or reload_tls)
