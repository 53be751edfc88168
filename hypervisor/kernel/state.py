"""What was attached on this host: ``<state dir>/<index>.json`` records, and the host lock.

The directory is ``$NBS_KERNEL_STATE_DIR`` (default /run/nbs/kernel); each device also has
``<index>.log``, its supervisor's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from hypervisor.kernel.errors import KernelError
from hypervisor.kernel.records import Record

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/nbs/kernel")


def state_dir() -> Path:
    return Path(os.environ.get("NBS_KERNEL_STATE_DIR") or DEFAULT_STATE_DIR)


def record_path(directory: Path, index: int) -> Path:
    return directory / f"{index}.json"


def save_record(directory: Path, record: Record) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = record_path(directory, record.index)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(record.to_json() + "\n")
    os.replace(tmp, path)


def load_records(directory: Path) -> dict[int, Record]:
    """Every readable record, by device index (unreadable ones are logged and skipped)."""
    records: dict[int, Record] = {}
    with contextlib.suppress(OSError):
        for path in sorted(directory.glob("*.json")):
            try:
                record = Record.from_json(path.read_text())
            except (OSError, ValueError, TypeError) as err:
                log.warning("ignoring unreadable state file %s: %s", path, err)
                continue
            records[record.index] = record
    return records


def remove_record(directory: Path, index: int, *, pid: int | None = None) -> None:
    """Forget device ``index`` (only if the record still names ``pid``, when one is given)."""
    path = record_path(directory, index)
    if pid is not None:
        current = load_records(directory).get(index)
        if current is None or current.pid != pid:
            return
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One attach or detach at a time on this host."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise KernelError(f"cannot use the state directory {directory}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
