"""The token-exchange protocol core (RFC 8693): plain functions over plain data, no I/O.

request -> client (authenticated at the edge) -> subject verification -> policy decision -> claims
"""
