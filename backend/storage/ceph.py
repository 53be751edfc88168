"""The connection to a Ceph cluster shared by RADOS object stores and RBD volumes.

One :class:`RadosCluster` per process and cluster: a librados handle is a set of threads and
sockets to every monitor and OSD, made to be shared by every store and image of the process
(librados and librbd are thread safe).  The stores and images take an I/O context from it with
:meth:`RadosCluster.ioctx`; whoever created the cluster closes it after them.

Timeouts: librados waits forever by default for an OSD or a monitor that does not answer (a
dead OSD whose PGs have not moved elsewhere yet).  The cluster is configured with
``rados_osd_op_timeout``, ``rados_mon_op_timeout`` and ``client_mount_timeout`` so that such
an operation fails with ``ETIMEDOUT`` after ``timeout`` seconds instead: the NBD client gets an
error it can retry rather than a request that never completes.

Errors from the bindings become :class:`StorageError` through :func:`storage_error`, which
keeps the errno where it means something to the layers above and maps the rest to ``EIO``.

Two librados behaviours this module works around (both found by killing and restarting an
OSD under load, tests/integration/test_engines.py):

* A client whose OSD died and came back (on a new address) keeps sending to the old address
  and times out forever, until something makes it fetch the newest OSD map: a fresh client
  works at once.  After a timed-out operation the cluster fetches the latest map
  (``wait_for_latest_osdmap``) in a background thread, and keeps doing so every second until
  an operation succeeds (:meth:`RadosCluster.errors`).
* The Python binding's object listing (``Ioctx.list_objects``) ends the iteration *silently*
  on any error, so a timed-out listing looks like an empty pool: a chunked volume would read
  zeroes and a trim would keep data.  :meth:`RadosCluster.list_objects` lists through
  librados' C API instead (ctypes, on a second connection made on first use) and raises.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import ctypes.util
import errno
import threading
import time
from collections.abc import Iterator
from typing import Any

import rados

from backend.storage.base import StorageError

# Errnos passed through as they are; anything else reaches the layers above as EIO.
_KEPT = frozenset(
    {
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.EAGAIN,
        errno.ENOSPC,
        errno.EPERM,
        errno.EACCES,
        errno.ENOENT,
        errno.EEXIST,
        errno.EBUSY,
        errno.EINVAL,
        errno.EROFS,
        errno.ENOTEMPTY,
        errno.EOPNOTSUPP,
        errno.EFBIG,
        errno.EBADF,
    }
)
# librados/librbd's EBLOCKLISTED: this client was fenced (blocklisted) by another one.
EBLOCKLISTED = errno.ESHUTDOWN


def error_code(err: BaseException) -> int:
    """The positive errno a rados/rbd exception carries (``EIO`` if none)."""
    code = getattr(err, "errno", None)
    return abs(code) if isinstance(code, int) and code else errno.EIO


def storage_error(err: BaseException, what: str) -> StorageError:
    """``err`` from the rados or rbd binding as a StorageError about ``what``.

    A pool over its quota (``EDQUOT``) is ``ENOSPC``; a blocklisted (fenced) client is
    ``EPERM``: retrying cannot help, another client owns the data now.
    """
    code = error_code(err)
    if code == errno.EDQUOT:
        return StorageError(errno.ENOSPC, f"{what}: pool quota reached ({err})")
    if code == EBLOCKLISTED:
        return StorageError(errno.EPERM, f"{what}: this client was blocklisted (fenced): {err}")
    if code == errno.ENOTSUP:
        code = errno.EOPNOTSUPP
    return StorageError(code if code in _KEPT else errno.EIO, f"{what}: {err}")


@contextlib.contextmanager
def ceph_errors(what: str) -> Iterator[None]:
    """Turn a rados or rbd exception raised inside into a StorageError about ``what``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        if type(err).__module__ not in {"rados", "rbd"}:
            raise
        raise storage_error(err, what) from err


class UseGate:
    """Counts the calls in flight on a handle so that ``close`` can wait for them.

    Destroying a librados I/O context or librbd image while another thread is inside a call on
    it is a use-after-free in C, not an exception: every call runs inside ``use()``, which
    raises ``StorageError(EBADF)`` once ``close()`` began.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        with self._cond:
            if self._closed:
                raise StorageError(errno.EBADF, f"{self._what} is closed")
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def close(self) -> bool:
        """Refuse new calls and wait for those in flight; True only the first time."""
        with self._cond:
            if self._closed:
                return False
            self._closed = True
            self._cond.wait_for(lambda: self._active == 0)
            return True

    @property
    def closed(self) -> bool:
        return self._closed


class RadosCluster:
    """A librados connection, shared by every RADOS store and RBD image of a process.

    ``conffile``: a ceph.conf; ``None`` reads Ceph's default locations
    (``$CEPH_CONF``, ``/etc/ceph/ceph.conf``, ...) unless ``conf`` names ``mon_host``, in
    which case no file is read.  ``conf``: options set after the file (``{"mon_host": ...,
    "keyring": ...}``; they win over the timeouts below).  ``timeout`` (seconds): connecting,
    and every monitor and OSD operation, fail with ``ETIMEDOUT`` after it instead of hanging.

    Connects in the constructor; failures raise ``StorageError`` (``ETIMEDOUT`` when no
    monitor answered, ``ENOENT`` for a missing conf file).  Thread safe.  ``close()`` is
    idempotent; close every store and image that uses the cluster first.
    """

    def __init__(
        self,
        conffile: str | None = None,
        conf: dict[str, str] | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        self.timeout = timeout
        conf = dict(conf or {})
        if conffile is None and ("mon_host" in conf or "mon host" in conf):
            source: Any = rados.Rados.NO_CONF_FILE
        else:
            source = conffile
        seconds = f"{timeout:g}"
        options = {
            "rados_osd_op_timeout": seconds,
            "rados_mon_op_timeout": seconds,
            "client_mount_timeout": seconds,
            # NBD clients say when data must be durable (FLUSH, FUA), and RbdStorage flushes
            # librbd's cache for them: the cache may write back from the first write instead
            # of waiting for a first flush (librbd's guard for guests that never flush).
            "rbd_cache_writethrough_until_flush": "false",
            **conf,
        }
        self._conffile = conffile
        self._options = options
        self._lock = threading.Lock()
        self._closed = False
        self._healthy = True
        self._refresher: threading.Thread | None = None
        self._lister: _Lister | None = None
        with ceph_errors(f"cannot connect to the Ceph cluster ({conffile or 'default conf'})"):
            handle = rados.Rados(conffile=source)
            try:
                for name, value in options.items():
                    handle.conf_set(name, value)
                handle.connect(timeout=max(1, round(timeout)))
            except BaseException:
                handle.shutdown()
                raise
        self._rados = handle
        self.address: str = str(handle.get_addrs())
        self.instance_id: int = int(handle.get_instance_id())

    def ioctx(self, pool: str, namespace: str = "") -> Any:
        """A new ``rados.Ioctx`` on ``pool`` and ``namespace``; the caller closes it.

        A missing pool raises ``StorageError(ENOENT)``.
        """
        with self._lock:
            if self._closed:
                raise StorageError(errno.EBADF, "the Ceph cluster connection is closed")
            with ceph_errors(f"cannot open pool {pool!r}"):
                ioctx = self._rados.open_ioctx(pool)
        if namespace:
            ioctx.set_namespace(namespace)
        return ioctx

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """:func:`ceph_errors`, and after a timeout, refresh the OSD map until an operation
        succeeds again (see the module docstring)."""
        try:
            with ceph_errors(what):
                yield
        except StorageError as err:
            if err.errno == errno.ETIMEDOUT:
                self._unhealthy()
            raise
        self._healthy = True

    def _unhealthy(self) -> None:
        with self._lock:
            self._healthy = False
            if self._closed or self._refresher is not None:
                return
            self._refresher = threading.Thread(
                target=self._refresh_maps, name="rados-osdmap", daemon=True
            )
            self._refresher.start()

    def _refresh_maps(self, period: float = 1.0, give_up: float = 600.0) -> None:
        started = time.monotonic()
        try:
            while not self._closed and not self._healthy:
                with contextlib.suppress(Exception):
                    self._rados.wait_for_latest_osdmap()
                    if self._lister is not None:
                        self._lister.refresh()
                if time.monotonic() - started > give_up:
                    return
                time.sleep(period)
        finally:
            with self._lock:
                self._refresher = None

    def list_objects(self, pool: str, namespace: str, prefix: str = "") -> list[str]:
        """Names of the objects in ``pool``/``namespace`` starting with ``prefix``, unsorted;
        any error raises ``StorageError`` (unlike the Python binding's listing)."""
        with self._lock:
            if self._closed:
                raise StorageError(errno.EBADF, "the Ceph cluster connection is closed")
            if self._lister is None:
                self._lister = _Lister(self._conffile, self._options)
            lister = self._lister
        try:
            names = lister.list(pool, namespace, prefix)
        except StorageError as err:
            if err.errno == errno.ETIMEDOUT:
                self._unhealthy()
            raise
        self._healthy = True
        return names

    @property
    def handle(self) -> Any:
        """The ``rados.Rados`` handle (for monitor commands in tools and tests)."""
        return self._rados

    def close(self) -> None:
        """Shut the connection down; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            refresher, lister = self._refresher, self._lister
        if refresher is not None:
            refresher.join()
        if lister is not None:
            lister.close()
        self._rados.shutdown()

    def __enter__(self) -> RadosCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RadosCluster(client.{self.instance_id} at {self.address})"


class _Lister:
    """Object listing through librados' C API (ctypes) on a connection of its own, so that
    errors are errors (see the module docstring).  Thread safe (one listing at a time)."""

    def __init__(self, conffile: str | None, options: dict[str, str]) -> None:
        path = ctypes.util.find_library("rados") or "librados.so.2"
        lib = ctypes.CDLL(path, use_errno=True)
        p = ctypes.c_void_p
        lib.rados_create.argtypes = [ctypes.POINTER(p), ctypes.c_char_p]
        lib.rados_conf_read_file.argtypes = [p, ctypes.c_char_p]
        lib.rados_conf_set.argtypes = [p, ctypes.c_char_p, ctypes.c_char_p]
        lib.rados_connect.argtypes = [p]
        lib.rados_shutdown.argtypes = [p]
        lib.rados_shutdown.restype = None
        lib.rados_wait_for_latest_osdmap.argtypes = [p]
        lib.rados_ioctx_create.argtypes = [p, ctypes.c_char_p, ctypes.POINTER(p)]
        lib.rados_ioctx_destroy.argtypes = [p]
        lib.rados_ioctx_destroy.restype = None
        lib.rados_ioctx_set_namespace.argtypes = [p, ctypes.c_char_p]
        lib.rados_ioctx_set_namespace.restype = None
        lib.rados_nobjects_list_open.argtypes = [p, ctypes.POINTER(p)]
        lib.rados_nobjects_list_next.argtypes = [p, *([ctypes.POINTER(ctypes.c_char_p)] * 3)]
        lib.rados_nobjects_list_close.argtypes = [p]
        lib.rados_nobjects_list_close.restype = None
        self._lib = lib
        self._lock = threading.Lock()
        handle = p()
        self._check(lib.rados_create(ctypes.byref(handle), None), "rados_create")
        try:
            read = lib.rados_conf_read_file(handle, conffile.encode() if conffile else None)
            if conffile is not None or "mon_host" not in options:
                self._check(read, f"read {conffile or 'the default ceph.conf'}")
            for name, value in options.items():
                self._check(
                    lib.rados_conf_set(handle, name.encode(), str(value).encode()), f"set {name}"
                )
            self._check(lib.rados_connect(handle), "connect")
        except BaseException:
            lib.rados_shutdown(handle)
            raise
        self._handle = handle

    def _check(self, code: int, what: str) -> None:
        if code < 0:
            raise storage_error(_CError(-code), f"ceph {what}")

    def list(self, pool: str, namespace: str, prefix: str) -> builtins.list[str]:
        lib, p = self._lib, ctypes.c_void_p
        with self._lock:
            ioctx = p()
            self._check(
                lib.rados_ioctx_create(self._handle, pool.encode(), ctypes.byref(ioctx)),
                f"open pool {pool!r}",
            )
            try:
                lib.rados_ioctx_set_namespace(ioctx, namespace.encode())
                listing = p()
                self._check(
                    lib.rados_nobjects_list_open(ioctx, ctypes.byref(listing)),
                    f"list {pool}/{namespace}",
                )
                try:
                    return self._drain(listing, prefix, f"list {pool}/{namespace}")
                finally:
                    lib.rados_nobjects_list_close(listing)
            finally:
                lib.rados_ioctx_destroy(ioctx)

    def _drain(self, listing: ctypes.c_void_p, prefix: str, what: str) -> builtins.list[str]:
        names: builtins.list[str] = []
        entry, key, nspace = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_char_p()
        while True:
            code = self._lib.rados_nobjects_list_next(
                listing, ctypes.byref(entry), ctypes.byref(key), ctypes.byref(nspace)
            )
            if code == -errno.ENOENT:
                return names
            self._check(code, what)
            name = (entry.value or b"").decode("utf-8", "surrogateescape")
            if name.startswith(prefix):
                names.append(name)

    def refresh(self) -> None:
        with self._lock:
            self._lib.rados_wait_for_latest_osdmap(self._handle)

    def close(self) -> None:
        with self._lock:
            self._lib.rados_shutdown(self._handle)


class _CError(Exception):
    """A negative return code of librados' C API, shaped like the binding's exceptions."""

    def __init__(self, code: int) -> None:
        super().__init__(f"[errno {code}] {errno.errorcode.get(code, code)}")
        self.errno = code
