"""The names of the changes the audit trail records beside exchanges (``decision`` of an
``audit_events`` row): no import, so that the command line can offer them as choices without
loading the database layer."""

from __future__ import annotations

# policy_<action> for each policy_versions action, and key_<action>.
POLICY_ACTIONS = ("create", "update", "delete", "rollback", "enable", "disable")
KEY_ACTIONS = ("generate", "forward", "rotate", "retire", "remove", "encrypt")
CHANGES = tuple(f"policy_{a}" for a in POLICY_ACTIONS) + tuple(f"key_{a}" for a in KEY_ACTIONS)
EXCHANGES = ("granted", "denied")
SERVICE = "sidecar"  # the actor of changes the service makes by itself (scheduled rotation)
