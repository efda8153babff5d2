"""``python -m trio_agents.devserver``: it says where it listens, and a busy port is one clear
line and exit code 2 (the port-in-use case of ``trio-agents devserver`` is in test_cli.py)."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from trio_agents import ConfigError
from trio_agents.devserver import open_dev_server


async def test_prints_url_and_keys_then_serves_until_interrupted() -> None:
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(functools.partial(
            trio.run_process,
            [sys.executable, "-m", "trio_agents.devserver", "--port", "0", "--api-key", "k1",
             "--api-secret", "s1", "--availability-timeout", "10"],
            stdout=subprocess.PIPE, check=False))
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        text = line.decode()
        assert "LIVEKIT_API_KEY=k1 LIVEKIT_API_SECRET=s1" in text
        url = text.split("LIVEKIT_URL=")[1].split()[0]
        assert url.startswith("ws://127.0.0.1:") and not url.endswith(":0")
        async with httpx.AsyncClient() as http:
            answer = await http.get(url.replace("ws://", "http://") + "/")
        assert answer.text == "OK"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await process.wait() == 0


async def test_busy_port_is_a_config_error_naming_it() -> None:
    async with open_dev_server(port=0) as first:
        with pytest.raises(ConfigError) as info:
            async with open_dev_server(port=first.port):
                pass
    assert f"127.0.0.1:{first.port}" in str(info.value)
    assert "pick another port" in str(info.value)
