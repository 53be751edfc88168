"""Volumes: the catalogue of volumes, snapshots and clones in a data directory, the service
that manages them, and the server's YAML configuration.

    model.py      what the service talks about: volumes, snapshots, validation, VolumeError
    catalogue.py  the SQLite metadata of volumes, their layers and snapshots
    storages.py   where a volume's data lives: storage specs and named profiles
    backends.py   how the catalogue's layers map onto one kind of storage
    leases.py     owner leases of volumes being created (flock on DATA/creating/NAME)
    service.py    VolumeService: the lifecycle of volumes, snapshots and clones
    transfer.py   importing images into volumes and exporting them, with qemu-img
    client.py     how the volume commands reach the catalogue: in process or over the API
    cli.py        ``nbs volume …`` and ``nbs snapshot …``
    config.py     the server's YAML configuration and its validation
"""
