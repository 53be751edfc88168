"""Volume storages: the :class:`Storage` interface and its implementations."""

from backend.storage.base import Capabilities, Extent, Storage, StorageError
from backend.storage.file import FileStorage
from backend.storage.memory import MemoryStorage

__all__ = [
    "Capabilities",
    "Extent",
    "FileStorage",
    "MemoryStorage",
    "Storage",
    "StorageError",
]
