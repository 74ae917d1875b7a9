"""Replicas on one PostgreSQL database, as a Deployment runs them: three processes migrate a new
database at once (a Job and two starting pods), then two ``sidecar serve`` instances share it: one
signing key, identical JWKS, a token from either verifies with the other's keys, and the policy
and key changes they make are in the one audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import jwt
import pytest
import requests
import yaml
from sqlalchemy import Connection, create_engine, text

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    SIDECAR_ISSUER,
    TOKEN_EXCHANGE,
    ClientKeys,
    TestIdP,
    base_config,
    fresh_postgres_database,
)
from tests.launcher import SIDECAR, Served, start_serve

pytestmark = pytest.mark.postgres


def cli(config_file: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    return subprocess.Popen(
        [*SIDECAR, "--config", str(config_file), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def waiting(connection: Connection) -> int:
    """Sessions waiting for an advisory lock."""
    count: int = connection.execute(
        text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    ).scalar_one()
    return count


def exchange(served: Served, subject: str) -> str:
    answer = requests.post(
        served.token_url,
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "audience": CODE_SEARCH,
        },
        auth=("gateway", GATEWAY_SECRET),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def verify_with(served: Served, token: str) -> dict[str, object]:
    keys = jwt.PyJWKSet.from_json(
        requests.get(f"{served.url}/.well-known/jwks.json", timeout=10).text
    )
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, object] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        issuer=SIDECAR_ISSUER,
        audience=CODE_SEARCH,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    return claims


def test_three_concurrent_migrations_then_two_replicas_agree(tmp_path: Path) -> None:
    from sidecar.store.migrate import MIGRATION_LOCK, head_revision

    idp = TestIdP(tmp_path)
    with fresh_postgres_database("sidecar_replicas") as url:
        config = base_config(idp, ClientKeys(), url)
        config_file = tmp_path / "sidecar.yaml"
        config_file.write_text(yaml.safe_dump(config))

        # The test holds the migration lock until all three wait for it, then lets them race.
        holder = create_engine(url, isolation_level="AUTOCOMMIT")
        with holder.connect() as held:
            held.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            migrations = [cli(config_file, "db", "upgrade") for _ in range(3)]
            deadline = time.monotonic() + 60
            while waiting(held) < 3:
                assert time.monotonic() < deadline, "the migrations never waited for the lock"
                assert all(m.poll() is None for m in migrations), "a migration did not wait"
                time.sleep(0.05)
            held.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        holder.dispose()
        outcomes = [(m.wait(timeout=120), *m.communicate()) for m in migrations]
        assert [rc for rc, _, _ in outcomes] == [0, 0, 0], [err for _, _, err in outcomes]
        assert {out.strip() for _, out, _ in outcomes} == {
            f"database at revision {head_revision()}"
        }

        checked = cli(config_file, "db", "check", "--json")
        out, err = checked.communicate(timeout=60)
        assert checked.returncode == 0, err
        assert json.loads(out)["revision"] == head_revision()

        replicas: list[Served] = []
        try:
            for index in range(2):
                home = tmp_path / f"replica-{index}"
                home.mkdir()
                replicas.append(start_serve(home, config))
            one, other = replicas
            jwks = [
                requests.get(f"{r.url}/.well-known/jwks.json", timeout=10).json() for r in replicas
            ]
            assert jwks[0] == jwks[1]
            assert len(jwks[0]["keys"]) == 1  # one signing key, generated once

            subject = idp.token()
            assert verify_with(other, exchange(one, subject))["sub"] == "alice@example.com"
            assert verify_with(one, exchange(other, subject))["sub"] == "alice@example.com"

            # A rotation through one replica's CLI is recorded once, beside the exchanges.
            rotate = cli(one.config_file, "keys", "rotate", "--actor", "ops@example.com", "--json")
            out, err = rotate.communicate(timeout=60)
            assert rotate.returncode == 0, err
            kid = json.loads(out)["kid"]
            search = cli(one.config_file, "audit", "search", "--kind", "change", "--json")
            out, err = search.communicate(timeout=60)
            assert search.returncode == 0, err
            changes = json.loads(out)
            assert [(c["decision"], c["kid"], c["actor"]) for c in changes][:1] == [
                ("key_rotate", kid, "ops@example.com")
            ]
            assert [c["decision"] for c in changes].count("key_generate") == 1
            assert sum(c["decision"] == "policy_create" for c in changes) == len(config["policies"])
        finally:
            for served in replicas:
                served.kill()
