"""Shared test policy: no test may leave a child process or a file descriptor behind."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

import netns
from livekit_server import binary_path, server_binary


def pytest_configure(config: pytest.Config) -> None:
    # First, before any thread or child process exists (see tests/netns.py).
    netns.enter_private_network()


def _stage(item: pytest.Item) -> int:
    """Fast tests first, then the slow ones, then those against the real livekit-server, then
    the soak: a broken build shows in the first minutes."""
    if "soak" in item.nodeid:
        return 3
    if item.get_closest_marker("realserver") is not None:
        return 2
    return 1 if item.get_closest_marker("slow") is not None else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_stage)  # stable: within a stage, the files' own order
    binary = server_binary()
    if binary is None:
        skip = pytest.mark.skip(reason=f"no livekit-server binary at {binary_path()} (set "
                                       "LIVEKIT_SERVER_BIN to run the real-server tests)")
        for item in items:
            if item.get_closest_marker("realserver") is not None:
                item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    binary = server_binary()
    return (f"real-server tests: {binary}" if binary is not None
            else f"real-server tests: skipped, no livekit-server binary at {binary_path()}")


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
