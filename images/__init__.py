"""Guest images for NBS's VM tests, built on demand from installed Debian packages.

Nothing here is committed or downloaded: :mod:`images.tiny` assembles a kernel + initramfs (and
optionally an ext4 root filesystem image) from ``linux-image-amd64`` and ``busybox-static`` and
caches the result under ``images/cache/`` (see images/README.md).
"""
