"""The models (sidecar/store/models.py) hold what the code writes into them. test_migrate.py checks
that the migrations build these same tables; here, the names and sizes other modules rely on: the
audit INSERT names the event's fields, the cut columns are as long as the cut, and each value the
sidecar makes (a fingerprint, a jti, a kid, an error code, a policy name) fits its column."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import BaseModel
from sqlalchemy import Column, String, Text

from sidecar import errors
from sidecar.audit import DENIED, FIELDS, GRANTED, MAX_TEXT
from sidecar.audit.redact import TRUNCATED
from sidecar.config import AdminCredential, ClientConfig, PolicyConfig
from sidecar.config.common import SigningAlgorithm
from sidecar.exchange.grant import JtiSource
from sidecar.exchange.subject import token_fingerprint
from sidecar.keys.encryption import SCHEME
from sidecar.keys.material import generate_private_key, public_jwk
from sidecar.store.jtis import MAX_JTI_CHARS
from sidecar.store.models import (
    AuditEventRow,
    ClientAssertionJtiRow,
    LeaseRow,
    PolicyRow,
    PolicyVersionRow,
    SigningKeyRow,
)

AUDIT = AuditEventRow.__table__.c
SIGNING_ALGORITHMS = get_args(SigningAlgorithm)


def length(column: Column[object]) -> int:
    assert isinstance(column.type, String)
    assert column.type.length is not None
    return column.type.length


def field_max_length(model: type[BaseModel], name: str) -> int:
    for constraint in model.model_fields[name].metadata:
        if hasattr(constraint, "max_length"):
            return int(constraint.max_length)
    raise AssertionError(f"{model.__name__}.{name} has no max_length")


# --- the audit table ------------------------------------------------------------------------------


def test_the_audit_table_has_one_column_per_event_field_after_its_id() -> None:
    assert AuditEventRow.__tablename__ == "audit_events"
    assert [column.name for column in AuditEventRow.__table__.columns] == ["id", *FIELDS]


def test_the_audit_columns_the_writer_cuts_are_as_long_as_the_cut() -> None:
    assert {name: length(AUDIT[name]) for name in TRUNCATED} == dict.fromkeys(TRUNCATED, MAX_TEXT)


def test_the_audit_scope_and_audiences_are_unbounded_text() -> None:
    # The scope is bounded by the redaction (MAX_SCOPE_TEXT, over 255); audiences are JSON.
    assert type(AUDIT.scope.type) is Text
    assert type(AUDIT.audiences.type) is Text


def test_only_the_time_and_the_decision_are_always_recorded() -> None:
    # A denial records how far the request got: every other column may be empty.
    required = {column.name for column in AuditEventRow.__table__.columns if not column.nullable}
    assert required == {"id", "at", "decision"}


def test_the_decisions_fit_their_column() -> None:
    assert max(len(GRANTED), len(DENIED)) <= length(AUDIT.decision)


def test_every_error_code_fits_the_error_column() -> None:
    codes = [
        cls.error
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ProtocolError) and "error" in vars(cls)
    ]
    assert "invalid_target" in codes
    assert max(map(len, codes)) <= length(AUDIT.error)


def test_a_subject_token_fingerprint_fills_its_column_exactly() -> None:
    assert len(token_fingerprint("a.subject.token")) == length(AUDIT.subject_token_sha256) == 16


def test_a_minted_jti_fits_its_column() -> None:
    assert len(JtiSource()()) <= length(AUDIT.jti)


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_a_kid_fits_the_audit_and_the_keyring_columns(algorithm: str) -> None:
    kid = public_jwk(generate_private_key(algorithm), algorithm)["kid"]  # an RFC 7638 thumbprint
    assert len(kid) <= min(length(AUDIT.kid), length(SigningKeyRow.__table__.c.kid))


def test_the_issuer_column_holds_a_policy_audiences_length() -> None:
    # subject_issuer is a configured URL, as long as the policy table allows for URLs.
    assert length(AUDIT.subject_issuer) == length(PolicyRow.__table__.c.audience) == 2048


# --- the policy tables ----------------------------------------------------------------------------


def test_policy_names_fit_as_the_configuration_allows() -> None:
    assert field_max_length(PolicyConfig, "name") == length(PolicyRow.__table__.c.name) == 255
    assert length(PolicyVersionRow.__table__.c.name) == 255


def test_policy_audiences_fit_as_the_configuration_allows() -> None:
    assert field_max_length(PolicyConfig, "audience") == length(PolicyRow.__table__.c.audience)
    assert length(PolicyVersionRow.__table__.c.audience) == length(PolicyRow.__table__.c.audience)


def test_client_ids_fit_as_the_configuration_allows() -> None:
    allowed = field_max_length(ClientConfig, "client_id")
    for column in (
        PolicyRow.__table__.c.client_id,
        PolicyVersionRow.__table__.c.client_id,
        ClientAssertionJtiRow.__table__.c.client_id,
        AUDIT.client_id,
    ):
        assert length(column) == allowed == 255


def test_an_admin_actor_fits_the_change_columns() -> None:
    actor = "admin:" + "n" * field_max_length(AdminCredential, "name")
    assert len(actor) <= length(PolicyRow.__table__.c.updated_by)
    assert len(actor) <= length(PolicyVersionRow.__table__.c.changed_by)


def test_every_change_action_fits_its_column() -> None:
    actions = ("create", "update", "delete", "rollback")
    assert max(map(len, actions)) <= length(PolicyVersionRow.__table__.c.action)


def test_policy_lists_are_stored_as_json_text() -> None:
    columns = PolicyRow.__table__.c
    for name in ("scopes", "default_scopes", "copy_claims", "conditions"):
        assert type(columns[name].type) is Text, name


# --- keys, jtis, leases ---------------------------------------------------------------------------


def test_every_signing_algorithm_and_the_encryption_scheme_fit_their_columns() -> None:
    columns = SigningKeyRow.__table__.c
    assert max(map(len, SIGNING_ALGORITHMS)) <= length(columns.algorithm)
    assert len(SCHEME) <= length(columns.encryption)


def test_an_assertion_jti_is_accepted_up_to_its_column_size() -> None:
    assert length(ClientAssertionJtiRow.__table__.c.jti) == MAX_JTI_CHARS


def test_the_lease_names_the_stores_hold_fit_their_column() -> None:
    assert max(len("keyring"), len("policies")) <= length(LeaseRow.__table__.c.name)
