"""The configured upstream credentials (sidecar/upstreams.py): each kind handed out as the
policy's mode says, and nothing when the configuration and the stored policy disagree."""

from __future__ import annotations

import pytest

from sidecar.config.upstreams import UpstreamConfig
from sidecar.errors import InvalidTargetError
from sidecar.exchange.credentials import API_KEY_TOKEN_TYPE
from sidecar.upstreams import ConfiguredUpstreams

KEY = "vendor-key-" + "k" * 24


@pytest.fixture
def upstreams() -> ConfiguredUpstreams:
    return ConfiguredUpstreams(
        [
            UpstreamConfig.model_validate(
                {"name": "vendor", "credentials": {"type": "bearer", "token": KEY}}
            ),
            UpstreamConfig.model_validate(
                {
                    "name": "saas",
                    "credentials": {
                        "type": "client_credentials",
                        "token_url": "https://auth.saas.example/token",
                        "client_id": "sidecar",
                        "client_secret": "s" * 24,
                    },
                }
            ),
        ]
    )


def test_a_static_key_is_handed_out_for_a_static_policy(upstreams: ConfiguredUpstreams) -> None:
    credential = upstreams.credential("vendor", ("v.read",), "https://v.example", "static")

    assert (credential.access_token, credential.issued_token_type) == (KEY, API_KEY_TOKEN_TYPE)


@pytest.mark.parametrize(
    ("upstream", "mode"), [("vendor", "client_credentials"), ("saas", "static")]
)
def test_a_policy_whose_mode_no_longer_fits_its_upstream_gets_nothing(
    upstreams: ConfiguredUpstreams, upstream: str, mode: str
) -> None:
    # After a reload changed the upstream's kind, a stored policy still says the old mode.
    with pytest.raises(InvalidTargetError) as refused:
        upstreams.credential(upstream, ("v.read",), "https://v.example", mode)

    assert "do not fit" in refused.value.reason


def test_an_upstream_no_longer_configured_gets_nothing(upstreams: ConfiguredUpstreams) -> None:
    with pytest.raises(InvalidTargetError):
        upstreams.credential("gone", (), "https://v.example", "static")
