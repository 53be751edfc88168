"""Object stores: key → bytes stores that ChunkedStorage turns into volumes."""

from backend.storage.objects.base import ObjectStore
from backend.storage.objects.directory import DirectoryObjectStore
from backend.storage.objects.faulty import FaultyObjectStore
from backend.storage.objects.s3 import S3ObjectStore

__all__ = ["DirectoryObjectStore", "FaultyObjectStore", "ObjectStore", "S3ObjectStore"]
