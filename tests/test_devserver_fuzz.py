"""Differential-style fuzzing of the dev server (issue 13, item 6).

The cases of ``fuzz_inputs`` (request lines, headers, tokens with claims of every type, join
requests, Twirp bodies, worker messages) go over TCP to a dev server, a few per server. For
each: the answer is one livekit-server's rules allow (never looser: a token the rules refuse
is refused), no error of ours was logged (nothing needed the error boundary), and a good
request still succeeds afterwards. The conformance suite sends the same cases to the real
livekit-server with the same ``send_case``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_agents.devserver import open_dev_server

from fuzz_inputs import (
    Case,
    accepted,
    alive,
    join_cases,
    raw_requests,
    send_case,
    token_cases,
    twirp_cases,
    worker_cases,
)

KEY, SECRET = "devkey", "secret"
FUZZ = settings(max_examples=25, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(logging.Formatter().format(r) for r in self.records)


@pytest.fixture
def server_errors() -> Iterator[_Errors]:
    handler = _Errors()
    logger = logging.getLogger("trio_agents.devserver")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def run(cases: list[Case], errors: _Errors) -> None:
    """Send the cases to one fresh dev server over TCP, checking each answer and that the
    server still serves after it."""
    async def main() -> None:
        async with open_dev_server(port=0, api_key=KEY, api_secret=SECRET) as dev:
            url = f"http://127.0.0.1:{dev.port}"
            for case in cases:
                with trio.fail_after(60):  # a hang is a failure, not a stuck run
                    status, kind = await send_case(url, case, api_key=KEY, api_secret=SECRET)
                    assert status in case.expect, f"{case!r} got {status} ({kind})"
                    if 401 in case.expect and case.expect <= {401}:
                        assert not accepted(status)  # never looser
                    if case.family == "worker":  # the dispatch it caused is over
                        await dev.wait_until(lambda: all(j.done for j in dev.jobs.values()))
                    assert await alive(url), f"not serving after {case!r}"
                    assert not errors.records, f"{case!r}: {errors.text()}"

    errors.records.clear()
    trio.run(main)


FAMILIES = {
    "request lines, targets and headers": (raw_requests(), 4),
    "tokens with claims of every type": (token_cases(KEY, SECRET), 8),
    "join parameters": (join_cases(KEY, SECRET), 8),
    "twirp bodies": (twirp_cases(KEY, SECRET), 8),
    "worker messages": (worker_cases(KEY, SECRET), 3),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@FUZZ
@given(data=st.data())
def test_the_dev_server_answers_by_the_rules_and_survives(
    server_errors: _Errors, family: str, data: st.DataObject
) -> None:
    strategy, most = FAMILIES[family]
    run(data.draw(st.lists(strategy, min_size=1, max_size=most), label="cases"),
        server_errors)
