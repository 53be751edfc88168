"""Layers: storages that wrap another storage and add one thing (nbdkit's filters).

A layer forwards every Storage method explicitly, owns the storage it wraps (``close``
closes it) and keeps its capabilities unless it says otherwise.
"""

from backend.storage.layers.caching import CachingStorage
from backend.storage.layers.retrying import RetryingStorage

__all__ = ["CachingStorage", "RetryingStorage"]
