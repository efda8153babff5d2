"""The same malformed requests to the dev server and to the real livekit-server.

Hypothesis makes the cases (``fuzz_inputs``: request lines and headers, tokens with claims of
every type, join requests, Twirp bodies, worker messages); each goes to both servers, started
fresh for each example. The dev server must never accept what livekit-server refuses (never
looser), and must still serve after every case. Where the dev server is the stricter one, the
README lists why.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netns
from fuzz_inputs import (alive, join_cases, looser, raw_requests, send_case, token_cases,
                         twirp_cases, worker_cases)
from livekit_server import open_livekit_server
from trio_agents.devserver import open_dev_server

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

KEY, SECRET = "devkey", "secret"
FAMILIES = {
    "request lines, targets and headers": raw_requests(),
    "tokens with claims of every type": token_cases(KEY, SECRET),
    "join parameters": join_cases(KEY, SECRET),
    "twirp bodies": twirp_cases(KEY, SECRET),
    "worker messages": worker_cases(KEY, SECRET),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=2, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(data=st.data())
def test_the_dev_server_is_never_looser_than_livekit_server(family: str,
                                                            data: st.DataObject) -> None:
    cases = data.draw(st.lists(FAMILIES[family], min_size=1, max_size=6), label="cases")
    address, why = netns.rtc_address()
    assert address is not None, why

    async def main() -> None:
        async with open_livekit_server(address) as real, \
                open_dev_server(port=0, api_key=KEY, api_secret=SECRET) as dev:
            ours_url, theirs_url = f"http://127.0.0.1:{dev.port}", real.http_url
            for case in cases:
                with trio.fail_after(60):
                    theirs, their_kind = await send_case(theirs_url, case, api_key=KEY,
                                                         api_secret=SECRET)
                    ours, our_kind = await send_case(ours_url, case, api_key=KEY,
                                                     api_secret=SECRET)
                    assert not looser(ours, theirs), (
                        f"{case!r}: the dev server accepted ({ours} {our_kind}) what "
                        f"livekit-server refused ({theirs} {their_kind})")
                    assert await alive(ours_url), f"the dev server stopped serving: {case!r}"
                    assert await alive(theirs_url), f"livekit-server stopped serving: {case!r}"

    trio.run(main)
