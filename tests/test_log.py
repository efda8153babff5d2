"""Log levels, their precedence, and the two formats as a collector or a person sees them."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from trio_agents._errors import ConfigError
from trio_agents._log import (
    NOISY,
    TRACE,
    ColoredFormatter,
    JsonFormatter,
    parse_log_level,
    resolve_log_level,
    setup_logging,
    wants_colour,
)


@pytest.mark.parametrize(("text", "level"), [
    ("trace", TRACE), ("DEBUG", logging.DEBUG), ("Info", logging.INFO),
    ("warn", logging.WARNING), ("WARNING", logging.WARNING), ("error", logging.ERROR),
    (" critical\n", logging.CRITICAL),
])
def test_levels(text: str, level: int) -> None:
    assert parse_log_level(text) == level
    assert logging.getLevelName(TRACE) == "TRACE"


def test_unknown_level_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="trace, debug, info, warn, warning, error, critical"):
        parse_log_level("verbose")
    with pytest.raises(ValueError, match="from --log-level"):  # ConfigError is a ValueError
        parse_log_level("", source="--log-level")


def test_precedence_flag_option_environment_default() -> None:
    env = {"LIVEKIT_LOG_LEVEL": "error"}
    assert resolve_log_level("debug", "warn", env) == logging.DEBUG
    assert resolve_log_level(None, "warn", env) == logging.WARNING
    assert resolve_log_level(None, None, env) == logging.ERROR
    assert resolve_log_level("", "", {"LIVEKIT_LOG_LEVEL": ""}) == logging.INFO  # empty = unset
    assert resolve_log_level(None, None, {}, default=logging.DEBUG) == logging.DEBUG


def test_the_deciding_bad_value_is_an_error_naming_its_source() -> None:
    with pytest.raises(ConfigError, match="'loud' from LIVEKIT_LOG_LEVEL"):
        resolve_log_level(None, None, {"LIVEKIT_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match="from --log-level"):
        resolve_log_level("dbg", None, {"LIVEKIT_LOG_LEVEL": "info"})
    # a bad value that does not decide is never looked at
    assert resolve_log_level("info", None, {"LIVEKIT_LOG_LEVEL": "loud"}) == logging.INFO


def _record(**extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "agent", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "hello %s", "args": ("job",)})
    record.__dict__.update(extra)
    return record


def test_json_line_has_fields_and_extras() -> None:
    line = JsonFormatter().format(_record(job_id="AJ_1", room="r", agent_name="a",
                                          custom={"x": 1}, level="not the level"))
    entry = json.loads(line)
    assert entry["message"] == "hello job" and entry["level"] == "INFO"  # core keys win
    assert entry["name"] == "agent" and entry["pid"] > 0
    assert entry["timestamp"].endswith("+00:00")
    assert (entry["job_id"], entry["room"], entry["agent_name"]) == ("AJ_1", "r", "a")
    assert entry["custom"] == {"x": 1}
    assert "\n" not in line


def test_json_line_with_exception_stack_and_unserialisable_extra() -> None:
    try:
        raise ValueError("bad\nworse")
    except ValueError:
        record = _record(thing=object())
        record.exc_info = sys.exc_info()
    record.stack_info = "Stack (most recent call last):\n  here"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: bad\nworse" in entry["exc_info"] and "Traceback" in entry["exc_info"]
    assert entry["stack_info"].endswith("here")
    assert entry["thing"].startswith("<object")


def test_json_record_from_a_job_process_keeps_its_text_traceback() -> None:
    entry = json.loads(JsonFormatter().format(_record(exc_text="Traceback: boom")))
    assert entry["exc_info"] == "Traceback: boom"


def test_json_non_ascii_follows_the_stream() -> None:
    assert "é" in JsonFormatter().format(_record(room="café"))
    assert "\\u00e9" in JsonFormatter(ensure_ascii=True).format(_record(room="café"))


def test_coloured_formatter_plain_and_coloured() -> None:
    text = ColoredFormatter(colour=False).format(_record(job_id="AJ_1"))
    assert "\x1b[" not in text
    assert text.endswith("INFO     agent: hello job job_id=AJ_1")
    assert "\x1b[32mINFO" in ColoredFormatter(colour=True).format(_record())
    assert "\x1b[2mjob_id=AJ_1\x1b[0m" in ColoredFormatter(colour=True).format(
        _record(job_id="AJ_1"))


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_or_when_forced() -> None:
    assert not wants_colour(io.StringIO(), {})
    assert wants_colour(_Tty(), {})
    assert wants_colour(io.StringIO(), {"FORCE_COLOR": "1"})
    assert not wants_colour(_Tty(), {"NO_COLOR": "1"})
    closed = io.StringIO()
    closed.close()
    assert not wants_colour(closed, {})


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """Give the test the root logger and put its handlers and levels back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


def test_setup_logging_replaces_its_handler(root_logging: logging.Logger) -> None:
    before = len(root_logging.handlers)
    first, second = io.StringIO(), io.StringIO()
    setup_logging(logging.INFO, json=True, stream=first)
    setup_logging(logging.DEBUG, json=True, stream=second)
    assert len(root_logging.handlers) == before + 1
    logging.getLogger("x").debug("visible", extra={"job_id": "AJ_1"})
    assert first.getvalue() == ""
    entry = json.loads(second.getvalue().splitlines()[-1])
    assert (entry["message"], entry["job_id"]) == ("visible", "AJ_1")


def test_setup_logging_quiets_noisy_libraries_unless_trace(root_logging: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging(logging.DEBUG, json=False, stream=out, environ={})
    logging.getLogger("httpx").info("request sent")
    logging.getLogger("hypercorn.access").info("GET /")
    logging.getLogger("trio-websocket").warning("closed")
    assert "request sent" not in out.getvalue() and "GET /" not in out.getvalue()
    assert "closed" in out.getvalue() and "\x1b[" not in out.getvalue()
    setup_logging(TRACE, json=False, stream=out, environ={})
    logging.getLogger("httpx").log(TRACE, "bytes")
    assert "TRACE    httpx: bytes" in out.getvalue()
    setup_logging(logging.INFO, json=False, stream=out, environ={"FORCE_COLOR": "1"})
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    logging.getLogger("x").info("coloured")
    assert "\x1b[32mINFO" in out.getvalue()
