"""Object stores: key → bytes stores that ChunkedStorage turns into volumes."""

from backend.storage.objects.base import ObjectStore
from backend.storage.objects.directory import DirectoryObjectStore
from backend.storage.objects.faulty import FaultyObjectStore

__all__ = ["DirectoryObjectStore", "FaultyObjectStore", "ObjectStore"]
