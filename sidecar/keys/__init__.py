"""Signing keys: generation, storage and the keyring that signs minted tokens."""
