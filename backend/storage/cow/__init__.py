"""Copy-on-write volumes: a chain of layers on local files, with live snapshots and thin clones.

A volume is a chain of *layers*, listed from the bottom (oldest) to the top.  The top layer
takes the writes; the layers below it are frozen and shared: a snapshot is the chain up to a
frozen layer, a clone is a new empty top over a snapshot's chain.  Nothing is copied to make
either; a chunk is copied into the top only when it is first partially written there.

On disk a layer is two files sharing a path stem, ``STEM.data`` (the chunks at their offsets)
and ``STEM.map`` (a header and the allocation bitmap): see backend/storage/cow/format.py.

The chunk size is a power of two (64 KiB by default) and the same in every layer of a chain.
A layer may be smaller than the layers above it: past its end it holds no chunks.  A lower
layer is also cut at the size of every frozen layer above it, so a volume shrunk before a
snapshot does not show its old tail again in a clone made larger.

Reading a chunk takes it from the topmost layer whose bit is set; no layer means zeroes.
Writing sets the chunk's bit in the top once the whole chunk is there: a partial write to a
chunk the top lacks first *copies it up* (the rest of the chunk is read from below and written
with the new bytes).  Zeroing whole chunks punches them out of the top's data file and keeps
their bit set, so they read as zeroes and hide the layers below; a chunk no lower layer holds
simply loses its bit (a real hole) unless NBD's NO_HOLE asked to keep it allocated.

Durability ordering (what makes a crash safe):

1. Writes go to the data file only; bits change in memory and mark their map page dirty.
   Nothing is synced per write unless FUA.
2. ``flush()`` (and every FUA request) takes a copy of the dirty map pages, *then*
   ``fdatasync``\\s the data file, *then* writes those pages and ``fdatasync``\\s the map.  A bit
   is set in memory only after its chunk was written in full, so every bit in the copy covers
   data that the data sync makes durable: on disk, a set bit never points at data that is not.
3. So a crash loses exactly the writes not yet flushed (NBD's semantics): an unflushed chunk
   that was new to the top has no bit on disk and reads from the older layers again; an
   unflushed overwrite of a chunk the top already held reads as the old or the new bytes (or
   a mix at page granularity, as for any disk).  Nothing ever reads as garbage.
4. ``close()`` flushes nothing (the Storage contract): whoever closes without flushing loses
   the unflushed writes, exactly as after a crash.
5. Snapshots flush first; resizing flushes, grows the data file and syncs it before the map
   records the new size, and shrinks the map before the data file.

Concurrency: requests take a shared lock; :meth:`CowStorage.snapshot`, :meth:`~CowStorage.resize`
and :meth:`~CowStorage.close` take it exclusively, so they see no request half done and no
request sees them half done.  Writes to chunks the top already holds are a plain ``pwrite``;
anything that changes bits (copy-up, zeroing) holds a lock on its range of chunks, so two
writers to one chunk cannot lose each other's bytes while writes to other chunks run in
parallel.  Flushes are serialised with each other.

Opening a layer takes an advisory ``flock`` on its map: exclusive for the written top, shared
for frozen layers and read-only chains.  A second writer on a top (another process, or another
CowStorage in this one) fails with ``EBUSY`` instead of corrupting it.  Linux only.

The package, in the order its modules build on each other:

    format.py   the on-disk format: layer files, map header, create/remove/inspect layers
    bitmap.py   the allocation bitmap: bit runs, dirty pages, write-back to the map
    layer.py    one open layer: files, lock, bitmap; the order of map changes on resize
    engine.py   CowStorage, the request engine over a chain, and flatten_into
"""

from backend.storage.cow.bitmap import allocated_bytes
from backend.storage.cow.engine import CowStorage, flatten_into
from backend.storage.cow.format import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    VERSION,
    create_layer,
    layer_chunk_size,
    layer_files,
    layer_size,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "VERSION",
    "CowStorage",
    "allocated_bytes",
    "create_layer",
    "flatten_into",
    "layer_chunk_size",
    "layer_files",
    "layer_size",
]
