"""What every configuration section shares (sidecar/config/common.py): durations, strict models,
URL checks, duplicates, and the algorithms a configuration may name. The values a whole file
accepts, with the key path in each error, are tested in test_loading.py."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import ValidationError

from sidecar.config.common import (
    OMNIBUS_SCOPES,
    Duration,
    SigningAlgorithm,
    StrictModel,
    SubjectAlgorithm,
    check_http_url,
    parse_duration,
    refuse_duplicates,
)

# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("5 m", 300.0), ("0ms", 0.0), ("007s", 7.0)])
def test_a_duration_may_space_its_unit_and_pad_its_number(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5M", "1H", "2D", "10S", "5min", "5 m s"])
def test_units_are_lower_case_single_units(value: str) -> None:
    with pytest.raises(ValueError, match="must be a duration such as 30s, 15m or 24h"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_a_negative_number_is_refused_as_negative(value: float) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [[30], {"s": 30}, b"30s"])
def test_a_duration_of_another_type_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(value)


class Timings(StrictModel):
    interval: Duration = 10.0


def test_a_duration_field_holds_float_seconds() -> None:
    for value in ("15m", 900, "900000ms"):
        interval = Timings(interval=value).interval  # type: ignore[arg-type]
        assert (interval, type(interval)) == (900.0, float)
    assert Timings().interval == 10.0


def test_a_bad_duration_field_fails_validation_with_the_duration_message() -> None:
    with pytest.raises(ValidationError) as caught:
        Timings(interval="soon")  # type: ignore[arg-type]
    [error] = caught.value.errors()
    assert error["loc"] == ("interval",)
    assert "must be a duration such as 30s, 15m or 24h" in error["msg"]


# --- strict models --------------------------------------------------------------------------------


def test_a_strict_model_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError) as caught:
        Timings(intervall="1s")  # type: ignore[call-arg]
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


def test_a_strict_model_is_frozen() -> None:
    timings = Timings()
    with pytest.raises(ValidationError):
        timings.interval = 1.0  # type: ignore[misc]


# --- http(s) URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://IdP.Example.COM/tenant/",  # compared byte for byte: no normalisation
        "https://idp.example:8443/realms/a",
        "http://localhost:9000/x",
        "http://[::1]/",
    ],
)
def test_a_good_url_is_returned_unchanged(url: str) -> None:
    assert check_http_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://idp.example", "must be an absolute http(s) URL"),
        ("https:///path-only", "must be an absolute http(s) URL"),
        ("/relative/path", "must be an absolute http(s) URL"),
        ("http://idp.example", "must use https (plain http is allowed only on loopback)"),
        ("http://127.0.0.2", "must use https"),
        ("https://idp.example/?a=1", "must not have a query or fragment"),
        ("https://idp.example/#top", "must not have a query or fragment"),
    ],
)
def test_each_bad_url_is_refused_with_its_own_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_http_url(url)


@pytest.mark.parametrize("url", ["https://sidecar.example", "https://sidecar.example/"])
def test_without_a_path_allowed_a_bare_origin_is_accepted(url: str) -> None:
    assert check_http_url(url, allow_path=False) == url


def test_without_a_path_allowed_a_path_is_refused() -> None:
    with pytest.raises(ValueError, match="must not have a path"):
        check_http_url("https://sidecar.example/tenant", allow_path=False)


# --- duplicates -----------------------------------------------------------------------------------


def test_distinct_values_pass() -> None:
    refuse_duplicates("clients", ["a", "b", "A"])  # case matters
    refuse_duplicates("clients", [])


def test_a_value_twice_is_refused_naming_the_list_and_the_value() -> None:
    with pytest.raises(ValueError, match=r"^clients: 'b' appears twice$"):
        refuse_duplicates("clients", ["a", "b", "c", "b", "a"])  # the first repeat is named


# --- algorithms and scopes ------------------------------------------------------------------------


def test_no_symmetric_or_unsigned_algorithm_can_be_configured() -> None:
    for algorithms in (get_args(SubjectAlgorithm), get_args(SigningAlgorithm)):
        assert not [a for a in algorithms if a.upper().startswith("HS") or a.lower() == "none"]


def test_every_signing_algorithm_may_also_verify_a_subject_token() -> None:
    assert set(get_args(SigningAlgorithm)) <= set(get_args(SubjectAlgorithm))


def test_omnibus_scopes_are_lower_case() -> None:
    # A policy's scope is compared lower-cased with this set: "ALL" and "all" are both refused.
    assert all(scope == scope.lower() for scope in OMNIBUS_SCOPES)
