"""The ObjectStore interface: a flat key → bytes store under a chunked volume.

A volume backend that keeps data in objects (a directory of files, S3, RADOS) implements
:class:`ObjectStore`; :class:`backend.storage.chunked.ChunkedStorage` turns any of them into a
block device.  The contract, checked by tests/unit/storage/test_chunked.py:

* Keys are non-empty strings of ``[A-Za-z0-9._/-]``; a store may refuse others with
  ``StorageError(EINVAL)``.
* A missing key is not an error: ``get`` and ``get_range`` return ``None``, ``delete`` does
  nothing.  ``ENOENT`` is never raised for it.
* Empty objects exist (chunked volumes use them as whiteouts): ``get_range`` of one returns
  ``b""``, ``exists`` returns True.
* ``put`` is atomic: a concurrent or later ``get`` sees the whole old object or the whole new
  one, never a mix, also after a crash.
* A completed ``put``, ``put_range`` or ``delete`` is durable once ``sync()`` returns.
* Failures raise :class:`StorageError` with an errno: ``EIO`` (or ``ETIMEDOUT``,
  ``ECONNRESET``, ``EAGAIN``) for failures that may succeed when retried, ``ENOSPC`` when the
  store is full, ``EPERM``/``EACCES`` when refused, ``EBADF`` once closed.
* Every method may be called from several threads at once.
* Whoever creates a store closes it; ``close()`` is idempotent.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterator


class ObjectStore(abc.ABC):
    """A thread-safe key → bytes store.  Subclasses implement every abstract method."""

    #: True when :meth:`put_range` is implemented (a partial write without reading first).
    supports_offset_writes: bool = False

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The whole object at ``key``, or ``None`` if there is none."""

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """``object[offset:offset+length]`` (shorter only where the object ends), or ``None``.

        The default reads the whole object; stores with ranged reads override it.
        """
        data = self.get(key)
        if data is None:
            return None
        return data[offset : offset + length]

    def exists(self, key: str) -> bool:
        """Whether there is an object at ``key`` (possibly empty).

        The default reads the object's first byte; stores with a cheaper test override it.
        """
        return self.get_range(key, 0, 1) is not None

    @abc.abstractmethod
    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Replace the object at ``key`` with ``data``, atomically (see the module docstring)."""

    def put_range(self, key: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` inside the object, only if ``supports_offset_writes``.

        A missing object is created; bytes before ``offset`` that did not exist read as zeroes;
        the object grows when the write goes past its end.  Not atomic: a concurrent ``get``
        may see part of the write.
        """
        raise NotImplementedError(f"{type(self).__name__} has no offset writes")

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; nothing happens if there is none."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix``, in ascending order."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every ``put``, ``put_range`` and ``delete`` that completed before it durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; idempotent.  Later calls but ``close`` raise ``EBADF``."""

    def keys(self, prefix: str = "") -> builtins.list[str]:
        """``list(prefix)`` as a list (for tests and tools)."""
        return builtins.list(self.list(prefix))
