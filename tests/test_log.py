from __future__ import annotations

import io
import json
import logging

import pytest

from trio_agents._errors import ConfigError
from trio_agents._log import TRACE, ColoredFormatter, JsonFormatter, parse_log_level, setup_logging


@pytest.mark.parametrize(("text", "level"), [
    ("trace", TRACE), ("DEBUG", logging.DEBUG), ("Info", logging.INFO),
    ("warn", logging.WARNING), ("WARNING", logging.WARNING), ("error", logging.ERROR),
    ("critical", logging.CRITICAL),
])
def test_levels(text: str, level: int) -> None:
    assert parse_log_level(text) == level


def test_unknown_level_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="trace, debug, info, warn, error, critical"):
        parse_log_level("verbose")


def _record(**extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "agent", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "hello %s", "args": ("job",)})
    record.__dict__.update(extra)
    return record


def test_json_line_has_fields_and_extras() -> None:
    line = JsonFormatter().format(_record(job_id="AJ_1", room="r", agent_name="a", custom={"x": 1}))
    entry = json.loads(line)
    assert entry["message"] == "hello job" and entry["level"] == "INFO"
    assert entry["name"] == "agent" and entry["pid"] > 0 and entry["timestamp"].endswith("+00:00")
    assert (entry["job_id"], entry["room"], entry["agent_name"]) == ("AJ_1", "r", "a")
    assert entry["custom"] == {"x": 1}
    assert "\n" not in line


def test_json_line_with_exception_and_unserialisable_extra() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys
        record = _record(thing=object())
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: bad" in entry["exc_info"] and entry["thing"].startswith("<object")


def test_coloured_formatter_plain_without_tty() -> None:
    text = ColoredFormatter(colour=False).format(_record(job_id="AJ_1"))
    assert "\x1b[" not in text and "hello job" in text and "job_id=AJ_1" in text
    assert "\x1b[" in ColoredFormatter(colour=True).format(_record())


def test_setup_logging_replaces_its_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    out = io.StringIO()
    try:
        setup_logging(logging.INFO, json=True, stream=out)
        setup_logging(logging.DEBUG, json=True, stream=out)
        assert len(root.handlers) == len(before) + 1
        logging.getLogger("x").debug("visible")
        assert json.loads(out.getvalue().splitlines()[-1])["message"] == "visible"
        assert logging.getLogger("httpx").level == logging.WARNING
    finally:
        for handler in root.handlers[len(before):]:
            root.removeHandler(handler)
        root.setLevel(level)
