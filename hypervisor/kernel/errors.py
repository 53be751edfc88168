"""The kernel path's errors: ``KernelError`` and its subtree (drawn in hypervisor/errors.py).

``ERRORS`` maps each class name to its class: ``python -m hypervisor.kernel … --json`` reports
an error by name, and hypervisor/remote.py raises the same class again on this side.
"""

from __future__ import annotations

from hypervisor.errors import HypervisorError


class KernelError(HypervisorError):
    """The kernel nbd fallback refused or failed; the message says why in operator terms."""


class DriverMissingError(KernelError):
    """No nbd driver in the running kernel."""


class NotPermittedError(KernelError):
    """The nbd driver wants CAP_SYS_ADMIN."""


class TlsUnsupportedError(KernelError):
    """The kernel's NBD client has no TLS."""


class ExportError(KernelError):
    """The export cannot be used (server down, no such export, refused handshake)."""


class ServerDownError(ExportError):
    """Nothing answers at the server's address."""


class NoSuchExportError(ExportError):
    """The server answered but has no such export."""


class DeviceError(KernelError):
    """The kernel refused a command, or a device did not change state as asked."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SupervisorError(KernelError):
    """The supervisor process did not start."""


ERRORS: dict[str, type[KernelError]] = {
    cls.__name__: cls
    for cls in (
        KernelError,
        DriverMissingError,
        NotPermittedError,
        TlsUnsupportedError,
        ExportError,
        ServerDownError,
        NoSuchExportError,
        DeviceError,
        SupervisorError,
    )
}
