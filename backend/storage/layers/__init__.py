"""Layers: storages that wrap another storage and add one thing (nbdkit's filters).

Every layer is a :class:`ForwardingStorage`: it forwards every Storage method explicitly,
overrides only what it adds, owns the storage it wraps (``close`` closes it; ReadOnlyStorage
borrows it unless told) and keeps its capabilities unless it says otherwise.
"""

from backend.storage.layers.caching import CachingStorage
from backend.storage.layers.forwarding import ForwardingStorage
from backend.storage.layers.readonly import ReadOnlyStorage
from backend.storage.layers.retrying import RetryingStorage

__all__ = ["CachingStorage", "ForwardingStorage", "ReadOnlyStorage", "RetryingStorage"]
