"""The root of every error the hypervisor package raises, so a caller can catch them all.

Each module keeps its own subtree (the leaves are documented where they are raised); they
all meet here. ``nbs attach|detach|attached`` (hypervisor/cli.py ``run``) turns a
``HypervisorError`` into one line on stderr: exit code 2 for the usage errors, 1 for the
rest. Errors of the libraries underneath (qemu.qmp, libvirt, paramiko) are raised again as
one of these where they can reach a caller.

::

    HypervisorError
    ├── TargetError                  (also ValueError) a volume name or NBD URI that does not parse
    ├── CommandError                 hypervisor/cli.py: a command failed (exit 1)
    │   └── UsageError               it cannot run as asked (exit 2)
    ├── NbdClientError               hypervisor/nbdclient.py: the handshake failed
    │   ├── ServerUnreachableError   nothing answers at the server's address
    │   ├── ExportMissingError       the server has no such export
    │   └── ExportReadOnlyError      the export is read-only but was wanted writable
    ├── QmpError                     hypervisor/qmp.py and domain.py: QEMU or libvirt
    │   ├── VmUnreachableError       no QMP socket / QEMU or the domain gone
    │   ├── AttachExportError        export missing or server down (from the probe)
    │   ├── AttachConflictError      the volume name is attached with a different URI
    │   ├── NoFreeSlotError          no PCI slot / root port to hot-plug into
    │   ├── GuestNotReadyError       the guest is paused or did not release the disk
    │   └── NeedsOptionError         the request needs an option it was not given (exit 2)
    ├── KernelError                  hypervisor/kernel/: the kernel nbd driver
    │   ├── DriverMissingError       no nbd driver loaded
    │   ├── NotPermittedError        needs root (CAP_SYS_ADMIN)
    │   ├── TlsUnsupportedError      nbds:// targets
    │   ├── ExportError              the export cannot be used
    │   │   ├── ServerDownError
    │   │   └── NoSuchExportError
    │   ├── DeviceError              the kernel refused a command, or a device did not change
    │   ├── SupervisorError          the supervisor could not be started
    │   └── RemoteError              hypervisor/remote.py: SSH to the host failed
    │       └── HostKeyError         its host key is unknown or changed
    ├── NetlinkError                 (also OSError) hypervisor/netlink.py: the kernel's errno
    │   ├── FamilyNotFoundError      no such generic netlink family
    │   └── NotificationsLostError   multicast notifications were dropped
    └── MalformedMessageError        (also ValueError) a netlink message that does not parse
"""

from __future__ import annotations


class HypervisorError(Exception):
    """Anything the hypervisor package refuses or fails at; the message is for operators."""
