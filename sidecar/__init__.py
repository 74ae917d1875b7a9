"""token-exchange-sidecar: an OAuth 2.0 Token Exchange (RFC 8693) sidecar and mini authorization
server that mints one audience-bound, short-lived token per upstream hop."""

__version__ = "0.1.0"
