"""The WebRTC tests' network (tests/netns.py) is what it says it is."""

from __future__ import annotations

import os
import socket

import psutil

import netns


def test_rtc_address_is_a_local_non_loopback_address(rtc_address: str) -> None:
    assert not rtc_address.startswith("127.")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((rtc_address, 0))  # it is one of ours


def test_as_root_the_session_has_a_network_of_its_own() -> None:
    if os.geteuid() != 0 or os.environ.get("TRIO_AGENTS_TEST_NETNS", "1") == "0":
        assert netns.rtc_address()[1] != "private network namespace"
        return
    assert netns.rtc_address() == (netns.NETNS_ADDRESS, "private network namespace")
    names = set(psutil.net_if_addrs())
    assert names == {"lo", "ta0", "ta1"}, names  # the host's interfaces are not visible here
    with socket.socket() as sock:  # loopback works for every other test
        sock.bind(("127.0.0.1", 0))
