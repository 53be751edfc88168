"""Volumes: the catalogue (SQLite), VolumeService, storage specs, import/export, and the
catalogue served as the server's export directory (exports.VolumeExports)."""
