"""The composition of a running ``nbs serve``: the NBD server over fixed exports or the
volume catalogue, the management API, the metrics endpoint, signals and SIGHUP reload.

backend/cli.py parses the command line into a ServeConfig and calls :func:`serve`; this
module is where the packages meet (it may import everything in ``backend``).
"""

from __future__ import annotations

import logging
import queue
import signal
import ssl
from collections.abc import Callable, Mapping
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING

from backend import logs
from backend.config import (
    DEFAULT_LISTEN,
    DEFAULT_VOLUME_SIZE,
    ConfigError,
    ExportConfig,
    ServeConfig,
    parse_host_port,
)
from backend.nbd import TLSPolicy
from backend.node_clients import ConfiguredNodes, volumes_on_nodes
from backend.replication.supervisor import ResyncSupervisor
from backend.server import systemd
from backend.server.exports import Export, Exports, ExportTable
from backend.server.metrics import ReplicaSample, VolumeReplication
from backend.server.server import ServeError, Server, TCPAddress, UnixAddress, inherited_sockets
from backend.server.tls import TLSConfigError, TLSFiles, server_context
from backend.storage import FileStorage, Storage, StorageError
from backend.volumes.datadir import default_data_dir
from backend.volumes.exports import DEFAULT_VOLUME, VolumeExports
from backend.volumes.model import CreateRequest, Holder, VolumeError
from backend.volumes.service import VolumeService

if TYPE_CHECKING:
    from backend.api.server import ApiServer
    from backend.server.metrics_endpoint import MetricsEndpoint

log = logging.getLogger("nbs")


class UsageError(Exception):
    """Bad arguments or configuration: one line on stderr, exit code 2."""


def _open_exports(
    config: ServeConfig, keep: Mapping[ExportConfig, Export] | None = None
) -> list[Export]:
    """Open the configured exports; those in ``keep`` (a reload) keep their open storage."""
    keep = keep or {}
    specs = list(config.exports)
    exports: list[Export] = []
    seen: set[str] = set()
    opened: list[Storage] = []
    try:
        for spec in specs:
            if spec.name in seen:
                raise UsageError(f"export {spec.name!r} is given twice")
            seen.add(spec.name)
            if spec.tls is TLSPolicy.REQUIRED and config.tls is None:
                raise UsageError(f"export {spec.name!r} requires TLS but no certificate is set")
            policy = spec.tls or config.tls_policy
            kept = keep.get(spec)
            if kept is not None and kept.tls is policy:
                exports.append(kept)
                continue
            try:
                storage = FileStorage(spec.path, read_only=spec.read_only)
            except StorageError as err:
                raise UsageError(f"export {spec.name!r}: {err}") from err
            opened.append(storage)
            exports.append(
                Export(
                    name=spec.name,
                    storage=storage,
                    description=spec.description,
                    tls=policy,
                    read_only=spec.read_only,
                    min_block=spec.min_block,
                )
            )
    except UsageError:
        for each in opened:
            each.close()
        raise
    return exports


def _catalogue_exports(
    config: ServeConfig, server_ref: list[Server], nodes: ConfiguredNodes
) -> VolumeExports:
    """Serve every catalogued volume; an empty catalogue gets the embedded default volume."""
    data_dir = config.data_dir or default_data_dir()

    def holders(name: str) -> list[Holder]:
        if not server_ref:
            return []
        return [
            Holder(h.peer, h.writable, h.since, h.epoch) for h in server_ref[0].holders.of(name)
        ]

    try:
        service = VolumeService(
            data_dir,
            holders=holders,
            profiles=config.storages,
            default_storage=config.default_storage,
            nodes=nodes,
        )
        service.start_serving()
        if not service.catalogue.volumes():
            # On the default storage: a `dir` there must exist (or say create=true).
            service.create(
                CreateRequest(DEFAULT_VOLUME, DEFAULT_VOLUME_SIZE, description="NBS default volume")
            )
            log.info(
                "created volume %r (%d bytes, sparse) in %s",
                DEFAULT_VOLUME,
                DEFAULT_VOLUME_SIZE,
                data_dir,
            )
    except VolumeError as err:
        raise UsageError(err.message) from err
    except OSError as err:
        raise UsageError(f"cannot use data directory {data_dir}: {err.strerror}") from err
    return VolumeExports(service, tls=config.tls_policy)


def _tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    return server_context(TLSFiles(config.tls.cert, config.tls.key, config.tls.ca))


def _listeners(config: ServeConfig, inherited: bool) -> tuple[list[TCPAddress], list[UnixAddress]]:
    listen = config.listen or (() if inherited or config.sockets else (DEFAULT_LISTEN,))
    tcp = [TCPAddress(*parse_host_port(item)) for item in listen]
    return tcp, [UnixAddress(path) for path in config.sockets]


def _metrics(config: ServeConfig, server: Server) -> MetricsEndpoint | None:
    if config.metrics is None:
        return None
    # prometheus_client costs 4 MiB of RSS and 30 ms at start: only with metrics turned on.
    from backend.server.metrics_endpoint import MetricsEndpoint, MetricsError  # noqa: PLC0415

    try:
        return MetricsEndpoint(*parse_host_port(config.metrics.listen), server.metrics_snapshot)
    except MetricsError as err:
        raise ServeError(str(err)) from err


def _api(config: ServeConfig, table: Exports, server: Server) -> ApiServer | None:
    """The management API over the served catalogue (none with fixed --export files): on
    DATA/api.sock always, and on the ``api.listen`` addresses.  Raises ServeError."""
    if not isinstance(table, VolumeExports):
        return None
    # Imported here: FastAPI and uvicorn cost every other nbs command startup time.
    from backend.api.app import create_app  # noqa: PLC0415
    from backend.api.local import load_or_create_token, socket_path, token_path  # noqa: PLC0415
    from backend.api.server import ApiServer  # noqa: PLC0415

    service = table.service
    token = load_or_create_token(config.api.token_file or token_path(service.data_dir))
    urls: list[str] = []
    app = create_app(
        service,
        token=token,
        status=lambda: {
            "connections": server.session_count,
            "listeners": list(server.uris),
            "api": urls,
        },
    )
    tls = config.api.tls
    api = ApiServer(
        app,
        listen=[parse_host_port(address) for address in config.api.listen],
        unix=socket_path(service.data_dir),
        tls=TLSFiles(tls.cert, tls.key) if tls is not None else None,
    )
    urls.extend(api.start())
    return api


def _supervisor(config: ServeConfig, table: Exports) -> ResyncSupervisor | None:
    """The resync supervisor of the catalogue's replicated volumes (none with --export)."""
    if not isinstance(table, VolumeExports):
        return None
    supervisor = ResyncSupervisor(
        table.service.replicated_engines,
        config.replication.probe_interval,
        scrub_interval=config.replication.scrub_interval,
        scrub_repair=config.replication.scrub_repair,
    )
    supervisor.start()
    return supervisor


def _replication_metrics(
    service: VolumeService, supervisor: ResyncSupervisor
) -> tuple[VolumeReplication, ...]:
    """The metrics of the open replicated volumes (docs/operations.md)."""
    samples = []
    for volume, engine in sorted(service.replicated_engines().items()):
        status = engine.status()
        replicas = []
        for m in status.members:
            copied = supervisor.copied_bytes(volume, engine, m.member)
            copied += m.resync.bytes_copied if m.resync is not None else 0
            replicas.append(ReplicaSample(volume, m.member, m.state == "in_sync", copied))
        scrubbed = status.last_scrub
        samples.append(
            VolumeReplication(
                volume,
                status.members_failed,
                tuple(replicas),
                scrubbed_at=None if scrubbed is None else scrubbed.finished,
                scrub_unresolved=0 if scrubbed is None else scrubbed.unresolved,
            )
        )
    return tuple(samples)


def serve(config: ServeConfig, load: Callable[[], ServeConfig], source: str) -> int:
    """Run ``nbs serve`` with ``config`` until SIGTERM/SIGINT; on SIGHUP, ``load()`` gives
    the new configuration (read from ``source``: the config file or "the command line").
    Returns the exit code; raises UsageError, ConfigError, ServeError or TLSConfigError
    for what the user must fix before anything is served."""
    logs.configure(config.log_level, config.log_format)
    tls = _tls_context(config)
    server_ref: list[Server] = []
    table: Exports
    fixed: list[Export] = []
    nodes = None  # the catalogue's storage nodes (SIGHUP swaps them)
    if config.exports:
        fixed = _open_exports(config)
        table = ExportTable(fixed)
        names = ", ".join(e.name for e in fixed)
    else:
        nodes = ConfiguredNodes(config.nodes)
        table = _catalogue_exports(config, server_ref, nodes)
        names = f"the volumes in {table.service.data_dir}"
    inherited = inherited_sockets()
    tcp, unix = _listeners(config, bool(inherited))
    server = Server(
        table,
        tcp=tcp,
        unix=unix,
        inherited=inherited,
        tls=tls,
        io_threads=config.io_threads,
        limits=config.limits,
        max_request=config.max_request,
    )
    server_ref.append(server)
    metrics = None
    try:
        uris = server.bind()
        metrics = _metrics(config, server)
        api = _api(config, table, server)
    except ServeError:
        if metrics is not None:
            metrics.close()
        server.close_listeners()
        table.close()
        raise
    supervisor = _supervisor(config, table)
    if supervisor is not None and isinstance(table, VolumeExports):
        server.replication_metrics = partial(_replication_metrics, table.service, supervisor)
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.put(signum)  # acted on below: a handler must not log or take locks

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, on_signal)
    server.start()
    for uri in uris:
        print(f"nbs: listening on {uri} (exports: {names})", flush=True)
    for url in api.urls if api is not None else ():
        # Not "listening on": scripts and tests read those lines as NBD URIs.
        print(f"nbs: management API at {url}", flush=True)
    serving = _Serving(
        load,
        source,
        config,
        server,
        metrics=metrics,
        exports=dict(zip(config.exports, fixed, strict=True)),
        nodes=nodes,
    )
    serving.announce_metrics()
    systemd.notify(f"READY=1\nSTATUS={serving.status()}")
    while (signum := _next_signal(signals)) == signal.SIGHUP:
        serving.reload(inherited=bool(inherited))
    log.info("received %s, shutting down", signal.Signals(signum).name)
    systemd.notify("STOPPING=1\nSTATUS=stopping")
    if serving.metrics is not None:
        serving.metrics.close()
    # The API first: nothing may change the catalogue while the NBD side closes it.
    api_clean = api.stop(serving.config.shutdown_grace) if api is not None else True
    if supervisor is not None:
        # Before the engines close: a resync cut by their close resumes at the next start.
        supervisor.close(timeout=1.0)
    clean = server.shutdown(serving.config.shutdown_grace) and api_clean
    log.info("stopped%s", "" if clean else " with errors")
    # Stopped: a repeated SIGTERM or Ctrl-C must not turn a clean exit into death by signal
    # (Python restores the default handlers while the interpreter finalizes; ignored ones stay).
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, signal.SIG_IGN)
    return 0 if clean else 1


def _next_signal(signals: queue.SimpleQueue[int]) -> int:
    while True:
        try:  # a timeout, so that the signal handler gets to run promptly
            return signals.get(timeout=3600)
        except queue.Empty:
            continue


class _Serving:
    """What SIGHUP may change in a running ``nbs serve``: it re-reads the config file and
    applies log settings, TLS, static exports, listeners, the metrics endpoint and the
    storage nodes, or, if any of them fails, logs why and changes nothing."""

    def __init__(
        self,
        load: Callable[[], ServeConfig],
        source: str,
        config: ServeConfig,
        server: Server,
        *,
        metrics: MetricsEndpoint | None,
        exports: dict[ExportConfig, Export],
        nodes: ConfiguredNodes | None,
    ) -> None:
        self.load = load
        self.source = source
        self.config = config
        self.server = server
        self.metrics = metrics
        self.exports = exports  # static exports by the spec they were opened from
        self.nodes = nodes  # None with static exports: no replicated volumes

    def status(self) -> str:
        what = ", ".join(e.name for e in self.exports.values()) or "the volume catalogue"
        return f"serving {what} on {', '.join(self.server.uris)}"

    def announce_metrics(self) -> None:
        if self.metrics is not None:
            print(f"nbs: serving metrics on {self.metrics.url}", flush=True)

    def reload(self, *, inherited: bool) -> None:
        source = self.source
        log.info("received SIGHUP, reloading %s", source)
        systemd.notify(systemd.reloading())
        try:
            self._reload(inherited)
        except (UsageError, ConfigError, ServeError, TLSConfigError) as err:
            log.error("reload failed, the running configuration stays: %s", err)
            reason = " ".join(str(err).split())  # one line: a YAML error spans several
            systemd.notify(f"READY=1\nSTATUS=reload failed: {reason}; {self.status()}")
            return
        log.info("reloaded %s", source)
        systemd.notify(f"READY=1\nSTATUS={self.status()}")

    def _reload(self, inherited: bool) -> None:
        old = self.config
        config = self.load()
        if bool(config.exports) != bool(old.exports):
            raise UsageError("switching between exports and the volume catalogue needs a restart")
        for key in ("data_dir", "io_threads", "max_request", "api"):
            if getattr(config, key) != getattr(old, key):
                log.warning("reload: a change of %s takes effect on restart", key)
        tls = _tls_context(config)
        exports = _open_exports(config, keep=self.exports) if config.exports else []
        running = {id(e) for e in self.exports.values()}
        opened = [e for e in exports if id(e) not in running]
        metrics = self.metrics
        try:
            if config.metrics != old.metrics:
                metrics = _metrics(config, self.server)
            added = self.server.set_listeners(*_listeners(config, inherited))
        except ServeError:
            for export in opened:
                export.storage.close()
            if metrics is not None and metrics is not self.metrics:
                metrics.close()
            raise
        # Nothing fails from here on.
        logs.configure(config.log_level, config.log_format)
        self.server.set_limits(config.limits)
        self.server.set_tls(tls)
        if isinstance(self.server.table, VolumeExports):
            self.server.table.tls = config.tls_policy
            if self.nodes is not None:
                self._apply_nodes(config, self.nodes, self.server.table)
        else:
            kept = {id(e) for e in exports}
            retired = [e for e in self.exports.values() if id(e) not in kept]
            self.server.replace_exports(ExportTable(exports), retired)
            self.exports = dict(zip(config.exports, exports, strict=True))
            for export in opened:
                log.info("serving export %r", export.name)
            for export in retired:
                log.info("export %r removed (open connections keep it)", export.name)
        for uri in added:
            print(f"nbs: listening on {uri}", flush=True)
        if metrics is not self.metrics:
            if self.metrics is not None:
                self.metrics.close()
            self.metrics = metrics
            self.announce_metrics()
        self.config = config

    def _apply_nodes(
        self, config: ServeConfig, nodes: ConfiguredNodes, table: VolumeExports
    ) -> None:
        """Swap in the config's storage nodes (docs/replication.md, "Storage nodes and
        SIGHUP"); a removed node still holding replicas is the operator's to replace."""
        change = nodes.replace(config.nodes)
        for what, names in (
            ("added", change.added),
            ("changed", change.changed),
            ("removed", change.removed),
        ):
            if names:
                log.info("reload: storage nodes %s: %s", what, ", ".join(names))
        try:
            holding = volumes_on_nodes(table.service.catalogue, change.removed)
        except Exception as err:  # the reload is done: a warning must not undo or kill it
            log.warning("reload: cannot look up the replicas on removed nodes: %s", err)
            return
        for node, volumes in holding.items():
            log.warning(
                "reload: storage node %s left the config but holds replicas of %s, which"
                " cannot be reopened: replace them (nbs volume replica replace VOLUME %s NEW)",
                node,
                ", ".join(volumes),
                node,
            )
