"""One client connection: socket bytes <-> protocol core <-> the export's storage.

Concurrency model (docs/decisions/0001-concurrency-model.md): one thread per connection with a
blocking socket.  Requests for storages that declare ``inline`` (page-cache files, memory) run
on that thread, and the replies of every request parsed from one ``recv`` go out in one
``sendmsg``; pipelined clients (QD16) thus cost one recv and one send per batch.  Large
reads and writes, and every request of other storages, run on a shared worker pool and are
answered out of order as each completes; workers never block on a client's socket, and the
bytes a session has in flight are bounded (backend/server/outbox.py says how).

Requests longer than ``PAYLOAD_PIECE`` (up to ``max_request``) stream through the
connection thread one piece at a time: a WRITE is written as its pieces arrive, a READ is read
and sent piece by piece, so no request needs a buffer of its whole length
(docs/decisions/0020-large-requests-in-pieces.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from time import monotonic, perf_counter_ns

from backend.nbd import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    Disconnect,
    ExportForbiddenError,
    ExportListRequested,
    ExportRequested,
    ExportSelected,
    ExportUnavailableError,
    ProtocolError,
    Rejected,
    Request,
    ServerConnection,
    StartTLS,
    TLSPolicy,
    WritePiece,
)
from backend.nbd.constants import MAX_PAYLOAD, PAYLOAD_PIECE, Cmd, CmdFlag, Error, StateFlag
from backend.server.buffers import PayloadBuffers
from backend.server.exports import Export, Exports
from backend.server.fencing import Pass
from backend.server.holders import Holder, Holders
from backend.server.limits import DEFAULT_HANDSHAKE_TIMEOUT
from backend.server.metrics import BLOCK, LATENCY_BOUNDS_NS, SUM, SessionStats, record
from backend.server.outbox import Outbox
from backend.storage import Storage, StorageError
from backend.storage.base import MustNotWait, without_waiting

log = logging.getLogger(__name__)

RECV_SIZE = 128 * 1024
SEND_BATCH = 4 * 1024 * 1024  # flush queued replies once this many bytes wait
SPARSE_READ_MIN = 256 * 1024  # structured reads this long send holes as OFFSET_HOLE
MAX_IOV = 512
# Large reads and writes go to the pool even for inline storages: pread/pwrite and the socket
# copy then overlap, as both release the GIL (measured: 1 MiB QD4 reads and writes gain 25-60%).
OFFLOAD_MIN = 128 * 1024
_BULK = frozenset({Cmd.READ, Cmd.WRITE})
# Bytes of pool requests (payloads and replies) one session may have in flight before its
# connection thread waits: bounds a session's memory, and keeps one client that never reads
# its replies from holding more than its share of the workers' output.
INFLIGHT_BUDGET = 32 * 1024 * 1024
# Seconds a finished session waits for its client to read the replies still queued.
DRAIN_TIMEOUT = 30.0
# Seconds a session whose epoch was fenced out stays open, answering every request with EPERM
# (a woken engine learns it was fenced, not that the network failed), before it is closed.
REVOKED_GRACE = 10.0
_FENCED = "fenced out: the volume has promised a newer epoch"

_WIRE_ERRORS = {int(e) for e in Error}
_ERRNO_ALIASES = {errno.EDQUOT: Error.ENOSPC, errno.EFBIG: Error.ENOSPC, errno.EROFS: Error.EPERM}


def wire_error(code: int) -> int:
    """Map a storage errno to the NBD error the spec allows on the wire (EIO otherwise)."""
    if code in _WIRE_ERRORS:
        return code
    return int(_ERRNO_ALIASES.get(code, Error.EIO))


class Session:
    """Serves one accepted socket until the client leaves or the server stops."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        table: Exports,
        *,
        tls: ssl.SSLContext | None,
        pool: ThreadPoolExecutor,
        holders: Holders | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_request: int = MAX_PAYLOAD,
    ) -> None:
        self.sock: socket.socket = sock
        self.handshake_timeout = handshake_timeout  # seconds from accept to picking an export
        self.peer = peer
        self._table = table
        self._tls = tls
        self._pool = pool
        self._holders = holders or Holders()
        self._holder: Holder | None = None
        self._ticket: Pass | None = None  # admission to the volume's epoch fence, if fenced
        self._revoked_timer: threading.Timer | None = None  # closes it once fenced out
        self._chosen: Export | None = None  # admitted for GO / EXPORT_NAME, served from then
        self.conn = ServerConnection(
            tls_available=tls is not None,
            max_request=max_request,
            piece=PAYLOAD_PIECE,
        )
        self._outbox: Outbox | None = None  # once transmission starts
        self._stopped_reading = False  # by the server (shutdown), not the client
        self._idle = threading.Condition()
        self._inflight = 0  # requests on workers, until they posted their replies
        self._unanswered = 0  # of those, the ones whose replies are not posted yet
        self._storage_lock: threading.Lock | None = None
        self.export: Export | None = None
        self.stats = SessionStats()
        self._buffers = PayloadBuffers(OFFLOAD_MIN)
        self.conn.allocate_payload = self._buffers.allocate
        # The first error met by the pieces of the WRITE being streamed (code, message).
        self._piece_error: tuple[int, str] | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        try:
            self._run()
        except TimeoutError:  # only the handshake has a timeout
            log.info(
                "%s: closing: handshake not finished within %g s", self.peer, self.handshake_timeout
            )
        except ProtocolError as err:
            log.warning("%s: closing: %s", self.peer, err.reason)
        except (ConnectionError, ssl.SSLError) as err:
            log.info("%s: connection lost: %s", self.peer, err)
        except OSError as err:
            # The server shut the socket down underneath us while stopping.
            log.info("%s: connection ended: %s", self.peer, err)
        finally:
            self._wait_idle()
            if self._outbox is not None:
                # Stopped by the server, its input may be left unread: closing then resets
                # the link, so the replies must have reached the client first (outbox.py).
                self._outbox.close(DRAIN_TIMEOUT, deliver=self._stopped_reading)
            self._buffers.clear()
            if self._holder is not None:
                self._holders.release(self._holder)
            if self._revoked_timer is not None:
                self._revoked_timer.cancel()
            with contextlib.suppress(OSError):
                self.sock.close()

    def stop(self) -> None:
        """Answer new options with ERR_SHUTDOWN and new requests with ESHUTDOWN from now on."""
        self.conn.stopping = True

    def stop_reading(self) -> None:
        """End the session once what was received is answered (recv sees EOF)."""
        self._stopped_reading = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """Cut the connection (after stop() was not enough in time)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ handshake

    def _run(self) -> None:
        # One deadline for the whole handshake: a timeout per recv would let a client that
        # trickles a byte now and then hold its thread for ever.
        deadline = monotonic() + self.handshake_timeout
        self._time_left(deadline)
        self._sendall(self.conn.data_to_send())
        while True:
            if self._tls is not None and not self.conn.tls_active:
                # Kept current per option: in catalogue mode volumes come and go meanwhile.
                self.conn.tls_forced = all(
                    e.tls is TLSPolicy.REQUIRED for e in self._table.exports()
                )
            try:
                event = self.conn.next_event()
            except ProtocolError:
                # Options parsed before the broken one in the same read were executed:
                # their replies go out before the close.
                with contextlib.suppress(OSError):
                    self._sendall(self.conn.data_to_send())
                raise
            self._time_left(deadline)
            self._sendall(self.conn.data_to_send())
            if event is NEED_DATA:
                self._time_left(deadline)
                self.conn.receive_data(self.sock.recv(RECV_SIZE))
                continue
            if isinstance(event, StartTLS):
                assert self._tls is not None
                self._time_left(deadline)  # the TLS handshake keeps one deadline itself
                self.sock = self._tls.wrap_socket(self.sock, server_side=True)
                self.conn.tls_established()
            elif isinstance(event, ExportRequested):
                self._answer(event)
            elif isinstance(event, ExportListRequested):
                self.conn.export_list(self._table.exports())
            elif isinstance(event, ExportSelected):
                export = self._chosen
                assert export is not None  # admitted by _answer for the GO just accepted
                self.export = export
                if not export.storage.capabilities.thread_safe:
                    self._storage_lock = threading.Lock()
                log.info("%s: serving export %r", self.peer, export.name)
                self.sock.settimeout(None)
                self._transmit(export.storage)
                return
            elif isinstance(event, Aborted | ConnectionClosed):
                return

    def _answer(self, event: ExportRequested) -> None:
        """Answer the core with the export ``event`` names, looked up once.

        For GO / EXPORT_NAME the export is admitted by the server's holders (which serve it
        read-only to a second would-be writer of an exclusive volume) before the core replies,
        so a connection is never in use without being counted, and the session serves exactly
        the export, and storage, the client was told about.  Only an export the core will
        accept is admitted: one its TLS policy refuses gets previewed like INFO's.
        """
        try:
            export = self._table.get(event.name)
            if export is None:
                self.conn.export_refused()
                return
            if event.selects and self.conn.serves(export.tls):
                self._holder, export = self._holders.admit(self.peer, export, self._revoked)
                self._ticket = self._holder.ticket
                self._chosen = export
            else:
                export = self._holders.preview(export)
        except ExportForbiddenError as err:
            self.conn.export_refused(err.reason, forbidden=True)
            return
        except ExportUnavailableError as err:
            self.conn.export_refused(err.reason)
            return
        self.conn.export_chosen(export.describe())

    def _revoked(self) -> None:
        """A newer epoch fenced this session out (its requests in flight have finished)."""
        name = self._chosen.name if self._chosen is not None else "?"
        log.info("%s: fenced out of %r: closing in %g s", self.peer, name, REVOKED_GRACE)
        timer = threading.Timer(REVOKED_GRACE, self.stop_reading)
        timer.daemon = True
        timer.start()
        self._revoked_timer = timer

    def _time_left(self, deadline: float) -> None:
        """Let the next blocking call wait until ``deadline`` at most (TimeoutError after)."""
        left = deadline - monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)

    # ------------------------------------------------------------------ transmission

    def _transmit(self, storage: Storage) -> None:
        conn = self.conn
        sock = self.sock
        scratch = bytearray(RECV_SIZE)
        scratch_view = memoryview(scratch)
        inline = storage.capabilities.inline and self._storage_lock is None
        when_idle = storage.capabilities.inline_when_idle and self._storage_lock is None
        alone = 0
        outbox = self._outbox = Outbox(sock, INFLIGHT_BUDGET, self.peer)
        pending: list[bytes] = []
        queued = 0
        # Metrics, counted inline (backend/server/metrics.py says why and how).
        sizes = self.stats.bytes
        latency = self.stats.latency
        bounds = LATENCY_BOUNDS_NS
        while True:
            try:
                event = conn.next_event()
            except ProtocolError:
                # Requests parsed before the broken frame were executed: answer them, then
                # close (those on the pool answer themselves before run() closes the socket).
                if pending:
                    with contextlib.suppress(OSError):
                        outbox.send(pending)
                raise
            if event is NEED_DATA:
                if pending:
                    outbox.send(pending)
                    pending = []
                    queued = 0
                target = conn.payload_buffer()
                if target is not None:
                    conn.payload_received(sock.recv_into(target))
                else:
                    count = sock.recv_into(scratch)
                    conn.receive_data(scratch_view[:count] if count else b"")
                continue
            if type(event) is Request:
                command = event.command
                sizes[command] += event.length
                if when_idle:
                    # Requests in a row that found nothing else in flight or received: two
                    # make a client at queue depth 1.  One such moment inside a pipelined
                    # stream does not, and running it here would stop reading the stream.
                    alone = 0 if self._unanswered or conn.buffered else alone + 1
                if command == Cmd.READ and event.length > PAYLOAD_PIECE:
                    outbox.stream(self._read_pieces(storage, event))
                elif (inline and (event.length < OFFLOAD_MIN or command not in _BULK)) or (
                    # Queue depth 1 of a storage that waits on the network: a worker's
                    # hand-off would cost more than the request (docs/decisions/0131).
                    when_idle
                    and alone >= 2
                    and event.length < OFFLOAD_MIN
                    and storage.inline_ready()
                ):
                    start = perf_counter_ns()
                    try:
                        with without_waiting():
                            replies = self._execute(storage, event)
                    except MustNotWait as deferred:  # finished by a worker
                        self._offload(storage, event, start, deferred.finish)
                        continue
                    pending += replies
                    elapsed = perf_counter_ns() - start
                    latency[BLOCK[command] + bisect_left(bounds, elapsed)] += 1
                    latency[SUM[command]] += elapsed
                    queued += event.length if command == Cmd.READ else 16
                    if queued >= SEND_BATCH or len(pending) >= MAX_IOV:
                        outbox.send(pending)
                        pending = []
                        queued = 0
                else:
                    self._offload(storage, event, perf_counter_ns())
            elif type(event) is WritePiece:
                sizes[Cmd.WRITE] += len(event.data)
                reply = self._write_piece(storage, event)
                if reply is not None:
                    pending.append(reply)
            elif type(event) is Rejected:
                log.debug("%s: rejected %s: %s", self.peer, event.command, event.message)
                self.stats.reject(event.command, event.error)
                pending.append(
                    conn.reply_error(event.cookie, event.command, event.error, event.message)
                )
            elif isinstance(event, Disconnect | ConnectionClosed):
                if pending:
                    outbox.send(pending)
                if isinstance(event, ConnectionClosed) and not event.clean:
                    log.info("%s: client vanished mid-request", self.peer)
                return

    def _offload(
        self,
        storage: Storage,
        request: Request,
        queued_at: int,
        finish: Callable[[], None] | None = None,
    ) -> None:
        """Hand ``request`` to a worker, which answers it through the outbox; ``finish``:
        the request is under way, and ending it is ``finish()`` (MustNotWait)."""
        assert self._outbox is not None
        cost = request.length if request.command in _BULK else 64
        self._outbox.reserve(cost)
        with self._idle:
            self._inflight += 1
            self._unanswered += 1
        try:
            self._pool.submit(self._execute_async, storage, request, queued_at, cost, finish)
        except RuntimeError:  # the server is stopping: a request under way still ends here
            if finish is None:
                raise
            self._execute_async(storage, request, queued_at, cost, finish)

    def _execute_async(
        self,
        storage: Storage,
        request: Request,
        queued_at: int,
        cost: int,
        finish: Callable[[], None] | None = None,
    ) -> None:
        """``queued_at``: perf_counter_ns() at submission (waiting for a worker is latency);
        ``cost``: what the connection thread reserved for it in the outbox; ``finish``: see
        ``_offload``."""
        elapsed = 0
        replies: list[bytes] = []
        try:
            if finish is None:
                replies = self._execute(storage, request)
            else:
                replies = self._guarded(request, partial(self._finish, request, finish))
            elapsed = perf_counter_ns() - queued_at
            self._buffers.recycle(request.payload)
        finally:
            assert self._outbox is not None
            with self._idle:
                # Before the reply leaves: the client may send its next request at once.
                self._unanswered -= 1
                record(self.stats.pool_latency, request.command, elapsed)
            self._outbox.post(replies, cost)  # never blocks: see backend/server/outbox.py
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0)

    def _execute(self, storage: Storage, request: Request) -> list[bytes]:
        """Run one valid request against the storage and build its reply (EPERM, never run,
        if the session's epoch was fenced out: backend/server/fencing.py)."""
        ticket = self._ticket
        if ticket is None:
            return self._run_request(storage, request)
        inflight = ticket.inflight
        inflight.append(None)  # before the epoch check: a take waits for it to finish
        try:
            if ticket.epoch >= ticket.fence.epoch:
                return self._run_request(storage, request)
        except MustNotWait as deferred:
            # Under way on a worker: in flight for the fence until finish() ends.
            inflight.append(None)
            deferred.finish = _then(deferred.finish, inflight.pop)
            raise
        finally:
            inflight.pop()
        return [self._fenced_out(request.cookie, request.command)]

    def _fenced_out(self, cookie: int, command: Cmd) -> bytes:
        """The reply to a request of a fenced-out session; the session then ends."""
        self.stats.error(command, Error.EPERM)
        self.stop_reading()  # what was received is answered (EPERM too), then the close
        return self.conn.reply_error(cookie, command, Error.EPERM, _FENCED)

    def _run_request(self, storage: Storage, request: Request) -> list[bytes]:
        call = partial(self._dispatch, storage, request)
        if self._storage_lock is None:
            return self._guarded(request, call)
        with self._storage_lock:
            return self._guarded(request, call)

    def _finish(self, request: Request, finish: Callable[[], None]) -> list[bytes]:
        """End a write, zero, trim or flush that a storage left under way (MustNotWait)."""
        finish()
        return [self.conn.reply_ok(request.cookie)]

    def _guarded(self, request: Request, call: Callable[[], list[bytes]]) -> list[bytes]:
        """``call()``'s replies to ``request``, or the error reply of its failure."""
        conn = self.conn
        command = request.command
        try:
            return call()
        except MustNotWait:
            raise  # not a failure: the session hands the request to a worker
        except StorageError as err:
            log.warning(
                "%s: %s at %d+%d failed: %s",
                self.peer,
                command.name,
                request.offset,
                request.length,
                err,
            )
            code = wire_error(err.errno)
            self.stats.error(command, code)
            return [conn.reply_error(request.cookie, command, code, str(err))]
        except Exception:
            log.exception("%s: %s failed unexpectedly", self.peer, command.name)
            self.stats.error(command, Error.EIO)
            return [conn.reply_error(request.cookie, command, Error.EIO, "internal error")]

    def _dispatch(self, storage: Storage, request: Request) -> list[bytes]:
        command = request.command
        cookie = request.cookie
        offset = request.offset
        length = request.length
        flags = request.flags
        conn = self.conn
        if command == Cmd.READ:
            if (
                length >= SPARSE_READ_MIN
                and conn.structured_replies
                and not flags & CmdFlag.DF
                and storage.capabilities.cheap_extents
            ):
                return conn.reply_read_parts(cookie, _read_parts(storage, offset, length))
            return conn.reply_read(cookie, offset, storage.read(offset, length))
        if command == Cmd.WRITE:
            storage.write(offset, request.payload, bool(flags & CmdFlag.FUA))
        elif command == Cmd.FLUSH:
            storage.flush()
        elif command == Cmd.TRIM:
            storage.trim(offset, length, bool(flags & CmdFlag.FUA))
        elif command == Cmd.WRITE_ZEROES:
            storage.write_zeroes(
                offset,
                length,
                fua=bool(flags & CmdFlag.FUA),
                may_trim=not flags & CmdFlag.NO_HOLE,
                fast=bool(flags & CmdFlag.FAST_ZERO),
            )
        elif command == Cmd.CACHE:
            storage.cache(offset, length)
        elif command == Cmd.BLOCK_STATUS:
            return [conn.reply_block_status(cookie, _descriptors(storage, request))]
        if flags & CmdFlag.FUA and command in (Cmd.FLUSH, Cmd.CACHE):
            storage.flush()
        return [conn.reply_ok(cookie)]

    # ------------------------------------------------------------------ requests in pieces

    def _locked(self) -> contextlib.AbstractContextManager[object]:
        return self._storage_lock if self._storage_lock is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _fenced(self) -> Iterator[None]:
        """Run one piece of a long request under the storage lock, if any, and only while the
        session's epoch is current (StorageError EPERM otherwise; see _execute)."""
        ticket = self._ticket
        with self._locked():
            if ticket is None:
                yield
                return
            ticket.inflight.append(None)
            try:
                if not ticket.current():
                    raise StorageError(errno.EPERM, _FENCED)
                yield
            finally:
                ticket.inflight.pop()

    def _end_if_fenced_out(self) -> None:
        """Stop reading once a long request of a fenced-out session is answered.  Not before:
        a WRITE's payload still on the wire would be unread at the close, and the kernel would
        reset the connection, dropping the EPERM reply on its way to the client."""
        ticket = self._ticket
        if ticket is not None and not ticket.current():
            self.stop_reading()

    def _write_piece(self, storage: Storage, piece: WritePiece) -> bytes | None:
        """Write one piece of a long WRITE; the reply once its last piece is written."""
        if self._piece_error is None:
            try:
                with self._fenced():
                    storage.write(piece.offset, piece.data, bool(piece.flags & CmdFlag.FUA))
            except StorageError as err:
                log.warning("%s: WRITE at %d failed: %s", self.peer, piece.offset, err)
                self._piece_error = (wire_error(err.errno), str(err))
            except Exception:
                log.exception("%s: WRITE failed unexpectedly", self.peer)
                self._piece_error = (int(Error.EIO), "internal error")
        self._buffers.recycle(piece.data)
        if not piece.last:
            return None
        error, self._piece_error = self._piece_error, None
        if error is None:
            return self.conn.reply_ok(piece.cookie)
        self.stats.error(Cmd.WRITE, error[0])
        self._end_if_fenced_out()
        return self.conn.reply_error(piece.cookie, Cmd.WRITE, error[0], error[1])

    def _read_pieces(self, storage: Storage, request: Request) -> Iterator[list[bytes]]:
        """The reply to a long READ, read one piece at a time as the previous one is sent.

        An error on the first piece is an ordinary error reply.  Later, structured replies
        end with an error chunk; a simple reply cannot report it once its header went out,
        so the connection is cut (the spec's advice for errors after data).
        """
        conn = self.conn
        cookie = request.cookie
        sparse = conn.structured_replies and storage.capabilities.cheap_extents
        pos = request.offset
        end = pos + request.length
        while pos < end:
            size = min(PAYLOAD_PIECE, end - pos)
            try:
                with self._fenced():
                    if sparse:
                        parts = _read_parts(storage, pos, size)
                    else:
                        parts = [(pos, size, storage.read(pos, size))]
            except Exception as err:
                code = wire_error(err.errno) if isinstance(err, StorageError) else Error.EIO
                log.warning("%s: READ at %d+%d failed: %s", self.peer, pos, size, err)
                self.stats.error(Cmd.READ, code)
                self._end_if_fenced_out()
                if pos == request.offset or conn.structured_replies:
                    yield [conn.reply_error(cookie, Cmd.READ, code, str(err))]
                else:
                    self.abort()
                return
            first = pos == request.offset
            pos += size
            yield conn.reply_read_parts(cookie, parts, first=first, last=pos == end)

    # ------------------------------------------------------------------ sending

    def _sendall(self, data: bytes) -> None:
        if data:
            self.sock.sendall(data)


def _read_parts(storage: Storage, offset: int, length: int) -> list[tuple[int, int, bytes | None]]:
    """Split a read into data and hole parts using the storage's extents."""
    parts: list[tuple[int, int, bytes | None]] = []
    end = offset + length
    pos = offset
    while pos < end:
        start = pos
        for extent in storage.extents(pos, end - pos):
            run = min(extent.length, end - extent.offset)
            if extent.zero:
                parts.append((extent.offset, run, None))
            else:
                parts.append((extent.offset, run, storage.read(extent.offset, run)))
            pos = extent.offset + run
            if pos >= end:
                break
        if pos == start:  # a storage breaking its extents contract must not hang us
            parts.append((pos, end - pos, storage.read(pos, end - pos)))
            break
    return parts


def _descriptors(storage: Storage, request: Request) -> list[tuple[int, int]]:
    if not storage.capabilities.can_extents:
        return [(request.length, 0)]
    out: list[tuple[int, int]] = []
    for extent in storage.extents(request.offset, request.length):
        state = (StateFlag.HOLE if extent.hole else 0) | (StateFlag.ZERO if extent.zero else 0)
        if out and out[-1][1] == state:
            out[-1] = (out[-1][0] + extent.length, state)
        else:
            out.append((extent.length, int(state)))
        if request.flags & CmdFlag.REQ_ONE:
            break
    return out


def _then(first: Callable[[], None], then: Callable[[], object]) -> Callable[[], None]:
    """``first()``, then ``then()`` whatever ``first`` did."""

    def both() -> None:
        try:
            first()
        finally:
            then()

    return both
