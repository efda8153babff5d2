"""Shared test policy: no test may leave a child process or a file descriptor behind."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

import netns


def pytest_configure(config: pytest.Config) -> None:
    # First, before any thread or child process exists (see tests/netns.py).
    netns.enter_private_network()


@pytest.fixture(scope="session")
def rtc_address() -> str:
    """A non-loopback address for WebRTC (ICE never uses loopback); fails, never skips."""
    address, why = netns.rtc_address()
    if address is None:
        pytest.fail(why, pytrace=False)
    return address


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")} if os.path.isdir("/proc/self/fd") else set()


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Structured concurrency: a test ends with every process it started reaped."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    alive = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"test left child processes behind: {[p.pid for p in alive]}"
