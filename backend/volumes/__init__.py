"""Volumes: the catalogue of volumes, snapshots and clones in a data directory, the service
that manages them, and the catalogue served as the server's export directory.

    model.py       what the service talks about: volumes, snapshots, validation, VolumeError
    catalogue.py   the SQLite metadata of volumes, their layers and snapshots
    memberships.py  CatalogueMembershipStore: the membership records of replicated volumes
    storages.py    where a volume's data lives: storage specs and named profiles
    kinds.py       the registry: each storage kind and layer, its options and factory
    options.py     option values of kinds and layers: parsing, limits, defaults
    backends.py    how the catalogue's layers map onto one kind of storage
    replicated.py  the replicated kind's backend: replicas made on storage nodes, the engine
    locations.py   Backends: one backend per storage location, shared by its volumes
    leases.py      owner leases of volumes being created (flock on DATA/creating/NAME)
    service.py     VolumeService: the lifecycle of volumes, snapshots and clones
    transfer.py    importing images into volumes and exporting them, with qemu-img
    exports.py     VolumeExports: every ready volume as an NBD export of the same name
    operations.py  VolumeOperations: what the volume commands need, local or remote
    datadir.py     where the data directory is by default
"""
