"""sidecar/logs.py: one format for every log record (JSON objects with RFC 3339 UTC times, or
plain lines), the request id a client may give or the service makes, and the logging
configuration handed to granian and gunicorn."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator

import pytest

from sidecar import logs


@pytest.fixture
def restored_root() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("header", ["gw-0001", "a.b:c_d-e", "x" * 128])
def test_a_short_token_request_id_is_kept(header: str) -> None:
    assert logs.request_id_from(header) == header


@pytest.mark.parametrize("header", [None, "", "x" * 129, "two words", "new\nline", "é"])
def test_any_other_request_id_is_replaced_by_a_new_one(header: str | None) -> None:
    made = logs.request_id_from(header)
    assert made != header
    assert len(made) == 32
    assert made != logs.request_id_from(header)


def record(message: str = "hello") -> logging.LogRecord:
    return logging.LogRecord("sidecar.test", logging.WARNING, __file__, 1, message, None, None)


def test_json_records_carry_time_level_logger_message_pid_and_request_id() -> None:
    formatter = logs.formatter("json")
    entry = record()
    logs.RequestIdFilter().filter(entry)
    token = logs.REQUEST_ID.set("req-7")
    try:
        logs.RequestIdFilter().filter(entry)
    finally:
        logs.REQUEST_ID.reset(token)

    parsed = json.loads(formatter.format(entry))

    assert parsed["time"].endswith("Z")
    assert parsed["time"][10] == "T"
    assert parsed["level"] == "WARNING"
    assert parsed["logger"] == "sidecar.test"
    assert parsed["message"] == "hello"
    assert parsed["request_id"] == "req-7"
    assert isinstance(parsed["pid"], int)
    assert "request_suffix" not in parsed


def test_text_records_name_the_request_and_need_no_filter() -> None:
    formatter = logs.formatter("text")
    plain = formatter.format(record())
    entry = record()
    token = logs.REQUEST_ID.set("req-8")
    try:
        logs.RequestIdFilter().filter(entry)
    finally:
        logs.REQUEST_ID.reset(token)

    assert "WARNING sidecar.test: hello" in plain
    assert "sidecar.test [req-8]: hello" in formatter.format(entry)


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.resolve("auto", Terminal()) == "text"
    assert logs.resolve("auto", io.StringIO()) == "json"
    assert logs.resolve("text", io.StringIO()) == "text"


def test_configure_sends_every_record_through_one_handler_once(restored_root: None) -> None:
    stream = io.StringIO()
    logs.configure("json", stream)
    logs.configure("json", stream)  # again (a worker after its master): still one handler

    logging.getLogger("sidecar.anything").warning("once")
    logging.getLogger("_granian").warning("from the server")

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["once", "from the server"]


def test_the_servers_logging_configuration_uses_the_same_format(restored_root: None) -> None:
    config = logs.dict_config("json")
    logging.config.dictConfig(config)
    root = logging.getLogger()
    [handler] = root.handlers
    assert isinstance(handler.formatter, logs.Rfc3339Formatter)
    # gunicorn's access lines stay off unless SIDECAR_ACCESS_LOG asks for them.
    assert config["loggers"]["gunicorn.access"]["level"] == "WARNING"
