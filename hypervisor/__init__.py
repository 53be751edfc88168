"""Attach NBS volumes to VMs: QMP (qemu.qmp), libvirt, the kernel nbd driver, remote hosts.

Speaks in volumes and NBD URIs only; of the backend it uses nothing but the protocol's
numbers and byte layouts (``backend.nbd``). Every error class it defines derives from
``hypervisor.errors.HypervisorError`` (the tree is drawn there).
"""
