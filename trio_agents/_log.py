"""Log levels and the two log formats: JSON lines for ``start``, coloured lines for ``dev``.

Production logs go to a collector that wants one JSON object per line, so everything a record
carries — including the fields job processes attach (``job_id``, ``room``, ``agent_name``,
``pid``, the job's ``log_context_fields``) — becomes a key, and a traceback stays inside its
line. Development logs are for a person at a terminal: short, coloured when it is a terminal,
plain when piped, so a file never fills with escape codes.

Records from job processes arrive re-emitted in the server with those extra attributes; both
formatters print every non-standard attribute, so a job's lines carry their job in the merged
stream.
"""

from __future__ import annotations

import codecs
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

from ._errors import ConfigError

#: Below DEBUG: the chatty libraries of :data:`NOISY` speak too (the peer's TRACE is 5 as well).
TRACE: Final = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS: Final = {
    "trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
}
#: Attributes every LogRecord has; anything else on a record is an "extra" we print.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "taskName"}
#: Libraries that are chatty at debug level; kept at WARNING unless the level is TRACE.
NOISY: Final = ("hpack", "httpx", "httpcore", "hypercorn.access", "hypercorn.error",
                "trio-websocket", "watchfiles", "asyncio")


def parse_log_level(text: str, *, source: str = "") -> int:
    """``trace debug info warn warning error critical``, any case (the peer refuses "warning").

    Raises:
        ConfigError: any other text; the message names ``source`` (say ``"--log-level"``) and
            the accepted values.
    """
    level = _LEVELS.get(text.strip().lower())
    if level is None:
        where = f" from {source}" if source else ""
        raise ConfigError(f"unknown log level {text!r}{where}: use one of trace, debug, info, "
                          "warn, warning, error, critical")
    return level


def resolve_log_level(flag: str | None, option: str | None, environ: Mapping[str, str], *,
                      default: int = logging.INFO) -> int:
    """The level to log at: ``--log-level`` > the ``log_level`` option > ``LIVEKIT_LOG_LEVEL`` >
    ``default`` (INFO; the CLI passes DEBUG in dev).

    ``None`` or an empty string means "not given", so an empty ``LIVEKIT_LOG_LEVEL=`` falls
    through instead of failing. The first given value decides; a bad one is an error, not
    skipped, so a typo in a flag is never silently replaced by the environment's level.

    Raises:
        ConfigError: the deciding value is not a level; the message says where it came from.
    """
    for source, value in (("--log-level", flag), ("the log_level option", option),
                          ("LIVEKIT_LOG_LEVEL", environ.get("LIVEKIT_LOG_LEVEL"))):
        if value:
            return parse_log_level(value, source=source)
    return default


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: message, level, name, timestamp (ISO-8601 UTC), pid, every
    extra attribute, and ``exc_info``/``stack_info`` as text when present.

    The core keys win over a same-named extra, so a collector can always rely on them. Values
    JSON cannot hold are written with ``str()``. ``ensure_ascii`` is for streams that cannot
    encode everything (``setup_logging`` sets it when the stream is not UTF-8).
    """

    def __init__(self, *, ensure_ascii: bool = False) -> None:
        super().__init__()
        self._ensure_ascii = ensure_ascii

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "message": record.getMessage(),
            "level": record.levelname,
            "name": record.name,
            "timestamp": datetime.datetime.fromtimestamp(
                record.created, tz=datetime.timezone.utc).isoformat(),
            "pid": record.process,
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:  # re-emitted from a job process: already text
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=self._ensure_ascii)


_COLOURS: Final = {TRACE: "\x1b[2m", logging.DEBUG: "\x1b[36m", logging.INFO: "\x1b[32m",
                   logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m",
                   logging.CRITICAL: "\x1b[1;31m"}
_DIM: Final = "\x1b[2m"
_RESET: Final = "\x1b[0m"


class ColoredFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL    name: message key=value …`` (local time), for a person.

    With ``colour`` the level is coloured and the extras are dim; without, it is plain text.
    """

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
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour when ``stream`` is a terminal or ``FORCE_COLOR`` is set; never with ``NO_COLOR``
    (https://no-color.org)."""
    if environ.get("NO_COLOR"):
        return False
    if environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _is_utf(stream: TextIO) -> bool:
    encoding = getattr(stream, "encoding", None)
    if not encoding:  # StringIO and friends hold text, not bytes
        return True
    try:
        return codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


class _OurHandler(logging.StreamHandler[TextIO]):
    """Marks the handler ``setup_logging`` installed, so a second call replaces it."""


def setup_logging(level: int, *, json: bool, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None) -> None:
    """Log at ``level`` to ``stream`` through one handler on the root logger.

    Idempotent: a handler installed by an earlier call is replaced, never stacked (handlers of
    the application are left alone). Libraries in :data:`NOISY` are held at WARNING unless
    ``level`` is TRACE.

    Args:
        level: e.g. from :func:`resolve_log_level`.
        json: one JSON object per line (``start``) instead of coloured lines (``dev``).
        stream: default ``sys.stdout`` *at call time* (so a replaced stdout is honoured).
        environ: where ``FORCE_COLOR``/``NO_COLOR`` are read; default ``os.environ``.
    """
    out = stream if stream is not None else sys.stdout
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()  # leaves the stream open: StreamHandler never closes it
    handler = _OurHandler(out)
    if json:
        handler.setFormatter(JsonFormatter(ensure_ascii=not _is_utf(out)))
    else:
        colour = wants_colour(out, os.environ if environ is None else environ)
        handler.setFormatter(ColoredFormatter(colour=colour))
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level <= TRACE else max(level, logging.WARNING))
