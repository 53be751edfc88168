"""``python -m hypervisor.kernel``: the guest tests and hypervisor/remote.py run it this way."""

import sys

from hypervisor.kernel.cli import main

sys.exit(main())
