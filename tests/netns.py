"""Where the WebRTC tests run: a private network namespace (as root) or the host's own address.

WebRTC never offers loopback ICE candidates, so a room test needs an address that is not
127.0.0.1. As root (CI), the whole test session moves into a network namespace of its own
before any thread or process exists: loopback is brought up there (every other test keeps
using 127.0.0.1) and a veth pair with two private addresses gives WebRTC a network that
ends inside the namespace. Nothing leaves the machine, and the host's network is untouched.
Without root, the tests use the host's own address; with neither, they fail and say why.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from typing import Final

from trio_agents.devserver._media import host_address

#: The address the dev server advertises inside the namespace (the other veth end is .2).
NETNS_ADDRESS: Final = "10.203.0.1"
_PEER_ADDRESS: Final = "10.203.0.2"
_CLONE_NEWNET: Final = 0x40000000
_DISABLE: Final = "TRIO_AGENTS_TEST_NETNS"

_state: dict[str, str] = {}


def enter_private_network() -> None:
    """Move this process into a new network namespace with lo and a veth pair, if we may.

    Records the outcome (the address to use, or why there is none) for ``rtc_address``.
    """
    if os.environ.get(_DISABLE, "1") == "0":
        _state["skipped"] = f"{_DISABLE}=0"
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _state["skipped"] = "not running as root"
        return
    if threading.active_count() != 1:
        # unshare() moves only the calling thread; a thread made earlier would stay outside.
        _state["skipped"] = "threads were running before the namespace could be entered"
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        _state["skipped"] = f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}"
        return
    steps = [
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", "ta0", "type", "veth", "peer", "name", "ta1"],
        ["ip", "addr", "add", f"{NETNS_ADDRESS}/24", "dev", "ta0"],
        ["ip", "addr", "add", f"{_PEER_ADDRESS}/24", "dev", "ta1"],
        ["ip", "link", "set", "ta0", "up"],
        ["ip", "link", "set", "ta1", "up"],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise RuntimeError("the test session is in a private network namespace but `ip` "
                               "(iproute2) is missing: install iproute2, or set "
                               f"{_DISABLE}=0 to stay in the host's network") from None
        if done.returncode != 0:
            raise RuntimeError(f"setting up the test network namespace failed at "
                               f"`{' '.join(step)}`: {done.stderr.strip()} (set {_DISABLE}=0 "
                               "to stay in the host's network)")
    _state["address"] = NETNS_ADDRESS


def rtc_address() -> tuple[str | None, str]:
    """The address WebRTC can use here and where it comes from, or ``None`` and why not."""
    if "address" in _state:
        return _state["address"], "private network namespace"
    host = host_address()
    if host is not None:
        return host, f"host address ({_state.get('skipped', 'no namespace')})"
    return None, ("WebRTC needs a non-loopback IPv4 address and there is none: no private "
                  f"network namespace ({_state.get('skipped', 'not tried')}) and no network "
                  "interface with an IPv4 address other than 127.x. Run the tests as root "
                  "(they then make their own namespace) or on a machine with a network "
                  "interface.")
