"""Log levels and the two log formats: JSON lines for ``start``, coloured lines for ``dev``.

Records from job processes arrive re-emitted with extra attributes (``job_id``, ``room``,
``agent_name``, ``pid``, the job's ``log_context_fields``); both formatters print every such
extra attribute, so job records carry their job in the merged stream.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, Final, TextIO

from ._errors import ConfigError

TRACE: Final = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS: Final = {
    "trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
}
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime",
                                                                    "taskName"}
#: Libraries that are chatty at debug level; kept at WARNING unless the level is TRACE.
NOISY: Final = ("hpack", "httpx", "httpcore", "hypercorn.access", "hypercorn.error",
                "trio-websocket", "watchfiles", "asyncio")


def parse_log_level(text: str) -> int:
    """``trace debug info warn(ing) error critical``, any case."""
    level = _LEVELS.get(text.strip().lower())
    if level is None:
        raise ConfigError(f"unknown log level {text!r}: use one of trace, debug, info, warn, "
                          "error, critical")
    return level


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: message, level, name, timestamp, pid, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "message": record.getMessage(),
            "level": record.levelname,
            "name": record.name,
            "timestamp": datetime.datetime.fromtimestamp(
                record.created, tz=datetime.timezone.utc).isoformat(),
            "pid": record.process,
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


_COLOURS: Final = {TRACE: "\x1b[2m", logging.DEBUG: "\x1b[36m", logging.INFO: "\x1b[32m",
                   logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m",
                   logging.CRITICAL: "\x1b[1;31m"}
_DIM: Final = "\x1b[2m"
_RESET: Final = "\x1b[0m"


class ColoredFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL name message key=value …``, coloured when ``colour`` is true."""

    def __init__(self, *, colour: bool) -> None:
        super().__init__()
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        level = f"{record.levelname:<8}"
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        if self._colour:
            level = f"{_COLOURS.get(record.levelno, '')}{level}{_RESET}"
            extras = f"{_DIM}{extras}{_RESET}" if extras else ""
        line = f"{when} {level} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        elif record.exc_text:
            line = f"{line}\n{record.exc_text}"
        return line


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler ``setup_logging`` installed, so a second call replaces it."""


def setup_logging(level: int, *, json: bool, stream: TextIO | None = None) -> None:
    """One handler on the root logger (replacing an earlier one of ours), at ``level``."""
    out = stream or sys.stdout
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(out)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        tty = hasattr(out, "isatty") and out.isatty()
        handler.setFormatter(ColoredFormatter(colour=tty or bool(os.environ.get("FORCE_COLOR"))))
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(level if level <= TRACE else max(level, logging.WARNING))
