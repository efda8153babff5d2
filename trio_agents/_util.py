"""Small helpers shared by the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NoReturn

import trio


def reraise_unwrapped(error: BaseException) -> NoReturn:
    """Raise ``error`` again with its own cause and context (not "during handling of ...")."""
    cause, context, suppress = error.__cause__, error.__context__, error.__suppress_context__
    try:
        raise error
    finally:
        error.__cause__, error.__context__ = cause, context
        error.__suppress_context__ = suppress


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception in ``group`` if it nests exactly one at every level, else ``None``.

    An ``async with`` API that hosts its caller's block inside nurseries (its own or a
    library's) gets the block's error back wrapped in a group of one per nursery; this finds it
    so that the caller sees the error they raised.
    """
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        if len(error.exceptions) != 1:
            return None
        error = error.exceptions[0]
    return error


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every exception of ``group`` that is not itself a group, at any depth."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@contextlib.contextmanager
def unwrap_errors(*types: type[BaseException]) -> Iterator[None]:
    """Raise an error of one of ``types`` that leaves the block wrapped in exception groups as
    itself, with its own traceback and chain.

    Nurseries wrap whatever their tasks raise in an ``ExceptionGroup``; a public API that runs
    on nurseries promises its callers plain exceptions (``ConfigError``, ``AuthenticationError``,
    …). This is the one place that turns one into the other: a group whose only leaf, apart from
    cancellations, is of ``types`` becomes that leaf. Any other group (two failures at once, or
    a bug) is raised as it is, so nothing is hidden.

    Errors therefore leave nurseries the structured way, by propagating, never through an
    attribute or a ``nonlocal`` read after the nursery closed.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        found = [exc for exc in leaves(group) if not isinstance(exc, trio.Cancelled)]
        if len(found) == 1 and isinstance(found[0], types):
            reraise_unwrapped(found[0])
        raise


def tolerate_past_deadlines(loop: Any) -> None:
    """Let a trio-asyncio ``loop`` take a negative ``call_later`` delay, as asyncio does.

    asyncio runs a callback whose delay is negative as soon as it can; trio-asyncio asserts
    the delay is not negative. The realtime SDK's ``AudioSource.capture_frame`` computes a
    negative one whenever its producer runs late (a busy machine), which would crash the job.
    """
    call_later = loop.call_later

    def clamped(delay: float, callback: Any, *args: Any, **context: Any) -> Any:
        return call_later(max(delay, 0.0), callback, *args, **context)

    loop.call_later = clamped
