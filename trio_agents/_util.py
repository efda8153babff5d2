"""Small helpers shared by the package."""

from __future__ import annotations

from typing import NoReturn


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
