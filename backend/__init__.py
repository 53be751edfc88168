"""NBS storage server: the NBD protocol core, the server, storages, volumes and their API."""

import warnings

# Debian's python3-openssl (reached through the system site packages by urllib3, under boto3)
# touches names that newer `cryptography` releases deprecate; the warning is about that
# package pairing, not NBS, and would break the CLI's one-line output.
warnings.filterwarnings("ignore", message="DSA is deprecated", module="OpenSSL")
