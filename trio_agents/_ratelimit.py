"""Repeated log lines, rate-limited with a count. Pure: the caller passes the clock.

A refused offer, a failed reconnect: each is worth a line, a thousand a second are not. The
first occurrence of a kind is logged at once; later ones within ``window`` seconds are only
counted, and the next line that is let through says how many were left out.
"""

from __future__ import annotations

from typing import final

import attrs


@final
@attrs.define
class RateLimiter:
    window: float
    """At most one line per key per ``window`` seconds."""
    _last: dict[str, float] = attrs.field(factory=dict, repr=False)
    _suppressed: dict[str, int] = attrs.field(factory=dict, repr=False)

    def check(self, key: str, now: float) -> int | None:
        """``None``: leave this line out (it is counted). Else log it, adding that the returned
        number of lines of this key were left out before it (0: none)."""
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


def suppressed_note(count: int) -> str:
    """The suffix of a line that stands for ``count`` left-out ones ("" for none)."""
    return f" ({count} more like it left out since the previous line)" if count else ""
