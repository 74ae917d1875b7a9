"""token-exchange-sidecar: an OAuth 2.0 Token Exchange (RFC 8693) sidecar and mini authorization
server that mints one audience-bound, short-lived token per upstream hop."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout the package is installed from (editable install): where migrations/, deploy/ and
# keys/ live.
REPO_ROOT = Path(__file__).resolve().parents[1]
