"""The value codec under the IPC messages: JSON with limits, and typed fields (sans-io).

A job process runs user code, so whatever it writes on its socket is untrusted input for the
agent server. ``load_json`` parses a payload so that nothing in it can raise anything but
``RemoteProtocolError``:

- nesting deeper than ``MAX_DEPTH``, and more than ``MAX_CONTAINERS`` arrays and objects, are
  refused before the (recursive) JSON parser sees them, so it cannot raise
  ``RecursionError``, nor spend seconds on a frame of millions of empty arrays; so are more
  than ``MAX_ITEMS`` items and entries in all;
- an integer literal longer than ``MAX_INT_DIGITS`` characters is refused before it is
  converted (Python refuses > 4,300 digits with ``ValueError``, and converting is quadratic);
- ``NaN``, ``Infinity`` and a float literal that overflows to infinity (``1e400``) are refused.

``from_json(value, hint)`` then checks one field against its annotation, so every decoded
message is well typed: the receiver never trips over a field. The annotations say more than
the Python type where it matters, with ``typing.Annotated``:

- ``int``: a 64-bit signed integer, or ``Int(lo, hi)``;
- ``float``: finite, or ``Float(lo, hi)`` (``TIMESTAMP``: seconds in [0, 1e11], which every
  clock and formatter handles; ``SECONDS``: a duration ≥ 0, ``inf`` allowed and written
  ``"inf"``, for "no limit");
- ``str``: valid Unicode (no lone surrogate, so it encodes as UTF-8: protobuf and log files
  need that), or ``Text(max_len, choices)``;
- ``Mapping[str, V]``: at most ``MAX_ENTRIES`` entries, or ``Entries(max_entries, key)`` where
  ``key`` names a rule for the keys.

``to_json`` is the inverse, and checks what it writes by the same rules (a value we cannot
send is our bug: ``DecodeError``, reported as ``LocalProtocolError``). Text and mappings are
fitted instead, because log records carry what user code put in them: lone surrogates become
U+FFFD (a file name decoded with ``surrogateescape``), text is cut to its ``max_len``, and
mapping entries with a refused key, or beyond ``max_entries``, are left out.
"""

from __future__ import annotations

import base64
import functools
import binascii
import json
import logging
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Final, Union, final

import attrs

from .._errors import RemoteProtocolError
from .._loading import FunctionRef

#: Deepest nesting of arrays and objects in a payload. The messages need 2.
MAX_DEPTH: Final = 8
#: Most arrays and objects in a payload. The messages have at most 4.
MAX_CONTAINERS: Final = 64
#: Longest integer literal: "-9223372036854775808" has 20 characters.
MAX_INT_DIGITS: Final = 20
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: Most entries of a mapping field without an ``Entries`` annotation.
MAX_ENTRIES: Final = 1024
#: Longest key of a mapping field.
MAX_KEY_LENGTH: Final = 256
#: Most array items and object entries in a payload, all arrays and objects together.
MAX_ITEMS: Final = MAX_ENTRIES + 64

JsonScalar = str | int | float | bool | None


class DecodeError(ValueError):
    """One value breaks a rule; ``from_json`` callers turn it into ``RemoteProtocolError``."""


@final
@attrs.frozen
class Int:
    lo: int = INT64_MIN
    hi: int = INT64_MAX


@final
@attrs.frozen
class Float:
    lo: float = -math.inf
    hi: float = math.inf
    allow_inf: bool = False
    """``+inf`` is allowed (written ``"inf"``): a duration meaning "no limit"."""


@final
@attrs.frozen
class Text:
    max_len: int | None = None
    choices: tuple[str, ...] = ()


@final
@attrs.frozen
class Entries:
    max_entries: int = MAX_ENTRIES
    key: Callable[[str], str | None] | None = None
    """Returns why a key is refused, or ``None``."""


#: Seconds since the epoch or on a monotonic clock: [0, 1e11] (the year 5138).
TIMESTAMP: Final = Float(0.0, 1e11)
#: A duration in seconds; ``inf`` for no limit.
SECONDS: Final = Float(0.0, math.inf, allow_inf=True)

_RECORD_CLASS_ATTRIBUTES: Final = frozenset(dir(logging.LogRecord))


def log_record_key(key: str) -> str | None:
    """Extra fields of a log record become attributes of a ``logging.LogRecord``: none may
    shadow an attribute of the class (``getMessage``, ``__class__``). Its instance attributes
    (``name``, ``levelno``...) are set before the extras, which never replace them."""
    if key.startswith("_") or key in _RECORD_CLASS_ATTRIBUTES:
        return f"{key!r} is a reserved log record attribute"
    return None


# -- parsing ----------------------------------------------------------------------------------

#: A JSON string, or an unterminated one up to the end: from a quote it always matches, and
#: at once (no backtracking), so cutting the strings out stays linear whatever the payload.
_STRING: Final = re.compile(r'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_INNERMOST: Final = re.compile(r"[\[{][\]}]")


def _check_structure(text: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH``, more than ``MAX_CONTAINERS`` arrays and
    objects, and more than ``MAX_ITEMS`` items in them, in linear time and without
    recursion, before the JSON parser runs.

    Most payloads have a handful of brackets, counted in C: they cannot nest deeper. Else the
    strings are cut out and the brackets left are reduced: each pass removes the innermost
    pairs, so a balanced structure of depth d is gone after d passes.
    """
    if text.count(",") > MAX_ITEMS:
        items = _STRING.sub("", text).count(",") + 1
        if items > MAX_ITEMS:
            raise DecodeError(f"{items} array items or object entries (at most {MAX_ITEMS})")
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    opened = brackets.count("[") + brackets.count("{")
    if opened > MAX_CONTAINERS or len(brackets) - opened > MAX_CONTAINERS:
        raise DecodeError(f"{opened} arrays or objects and {len(brackets) - opened} closing "
                          f"brackets (at most {MAX_CONTAINERS})")
    for _ in range(MAX_DEPTH + 1):
        if not brackets:
            return
        brackets, removed = _INNERMOST.subn("", brackets)
        if not removed:
            return  # unbalanced: the JSON parser says where (it can only recurse so far)
    raise DecodeError(f"arrays or objects nested deeper than {MAX_DEPTH} levels")


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_INT_DIGITS:
        raise DecodeError(f"integer literal of {len(literal)} characters (at most "
                          f"{MAX_INT_DIGITS})")
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > 400:  # still parsed in linear time, but no real float is this long
        raise DecodeError(f"number literal of {len(literal)} characters")
    value = float(literal)
    if not math.isfinite(value):
        raise DecodeError(f"number {literal[:40]} is out of the float range")
    return value


def _parse_constant(name: str) -> object:
    raise DecodeError(f"{name} is not a number JSON allows")


def load_json(payload: bytes) -> object:
    """Payload → JSON value within the limits above. Raises ``RemoteProtocolError`` only."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"IPC message is not UTF-8: {exc}", reconnect=False) from exc
    try:
        _check_structure(text)
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise RemoteProtocolError(f"IPC message is not valid JSON: {exc}",
                                  reconnect=False) from exc
    except Exception as exc:  # DecodeError, and whatever else a parser may raise on garbage
        raise RemoteProtocolError(f"IPC message refused: {_describe(exc)}",
                                  reconnect=False) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {text}"


# -- typed fields -----------------------------------------------------------------------------


@functools.cache
def _split(hint: object) -> tuple[object, object | None, object, tuple[object, ...]]:
    """``Annotated[T, rule]`` → ``(T, rule, origin of T, args of T)``; cached per hint."""
    rule = None
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rule = extras[0] if extras else None
    return hint, rule, typing.get_origin(hint), typing.get_args(hint)


def _text(value: str, rule: object = None) -> str:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DecodeError(f"text with a lone surrogate at position {exc.start}") from None
    if isinstance(rule, Text):
        if rule.max_len is not None and len(value) > rule.max_len:
            raise DecodeError(f"text of {len(value)} characters (at most {rule.max_len})")
        if rule.choices and value not in rule.choices:
            raise DecodeError(f"{value[:40]!r} is not one of {', '.join(rule.choices)}")
    return value


def _int(value: int, rule: object = None) -> int:
    bounds = rule if isinstance(rule, Int) else Int()
    if not bounds.lo <= value <= bounds.hi:
        raise DecodeError(f"integer out of range [{bounds.lo}, {bounds.hi}]")
    return value


def _float(value: object, rule: object = None) -> float:
    bounds = rule if isinstance(rule, Float) else Float()
    if bounds.allow_inf and value == "inf":
        return math.inf
    if type(value) not in (int, float):
        raise DecodeError(f"expected a number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise DecodeError("expected a finite number")
    if not bounds.lo <= number <= bounds.hi:
        raise DecodeError(f"number {number:g} out of range [{bounds.lo:g}, {bounds.hi:g}]")
    return number


def _scalar(value: object) -> JsonScalar:
    if value is None or type(value) is bool:
        return value
    if type(value) is str:
        return _text(value)
    if type(value) is int:
        return _int(value)
    if type(value) is float:
        return _float(value)
    raise DecodeError(f"expected a scalar value, got {type(value).__name__}")


def from_json(value: object, hint: object) -> object:
    """One JSON value → the field's Python value, or ``DecodeError`` saying what is wrong."""
    base, rule, origin, args = _split(hint)
    if origin in (Union, types.UnionType):
        options = args
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return from_json(value, option)
            except DecodeError as exc:
                errors.append(str(exc))
        raise DecodeError("; ".join(errors))
    if base is float:
        return _float(value, rule)
    if base is str:
        if type(value) is not str:
            raise DecodeError(f"expected str, got {type(value).__name__}")
        return _text(value, rule)
    if base is int:
        if type(value) is not int:
            raise DecodeError(f"expected int, got {type(value).__name__}")
        return _int(value, rule)
    if base is bool:
        if type(value) is not bool:
            raise DecodeError(f"expected bool, got {type(value).__name__}")
        return value
    if base is bytes:
        if type(value) is not str:
            raise DecodeError(f"expected base64 text, got {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError(f"bad base64: {exc}") from None
    if base is FunctionRef:
        if (type(value) is not list or len(value) != 3
                or not all(type(v) is str for v in value)):
            raise DecodeError("expected [module, qualname, path]")
        return FunctionRef(*(_text(v) for v in value))
    if origin is Mapping:
        return _mapping(value, args[1], rule)
    raise TypeError(f"the IPC codec has no rule for {hint!r}")  # a bug here, not in the peer


def _mapping(value: object, value_hint: object, rule: object) -> dict[str, object]:
    if type(value) is not dict:
        raise DecodeError(f"expected an object, got {type(value).__name__}")
    entries = rule if isinstance(rule, Entries) else Entries()
    if len(value) > entries.max_entries:
        raise DecodeError(f"{len(value)} entries (at most {entries.max_entries})")
    out: dict[str, object] = {}
    for key, item in value.items():
        _text(key, Text(MAX_KEY_LENGTH))
        if entries.key is not None and (why := entries.key(key)) is not None:
            raise DecodeError(f"key {why}")
        if value_hint is str:
            if type(item) is not str:
                raise DecodeError(f"expected string values, got {type(item).__name__}")
            out[key] = _text(item)
        else:
            out[key] = _scalar(item)
    return out


def to_json(value: object, hint: object) -> object:
    """One field's Python value → a JSON value ``from_json`` turns back into it.

    Lone surrogates in text become U+FFFD; anything else ``from_json`` would refuse raises
    ``DecodeError`` (for the caller to report as our bug).
    """
    rule = _split(hint)[1]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, FunctionRef):
        value = [_valid_text(value.module), _valid_text(value.qualname), _valid_text(value.path)]
    elif isinstance(value, Mapping):
        value = _fit_mapping(value, rule if isinstance(rule, Entries) else Entries())
    elif value == math.inf and isinstance(rule, Float) and rule.allow_inf:
        return "inf"
    else:
        value = _plain(value)
        if (isinstance(value, str) and isinstance(rule, Text) and not rule.choices
                and rule.max_len is not None):
            value = value[:rule.max_len]
    from_json(value, hint)
    return value


def _fit_mapping(value: Mapping[object, object], entries: Entries) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.items():
        if len(out) == entries.max_entries:
            break
        text = _valid_text(str(key))
        if len(text) <= MAX_KEY_LENGTH and (entries.key is None or entries.key(text) is None):
            out[text] = _plain(item)
    return out


def _plain(value: object) -> object:
    """Subclasses of the JSON scalars (``IntEnum``, ``str`` subclasses) as the plain type."""
    if isinstance(value, str):
        return _valid_text(str(value))
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def _valid_text(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A surrogate pair becomes its character, a lone surrogate U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
