"""The command line's pure parts: log-level precedence and finding the server in a file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from trio_agents import AgentServer, ServerEnvOption, ServerOptions
from trio_agents._cli import explicit_log_level, load_server
from trio_agents._log import TRACE, resolve_log_level
from trio_agents._errors import ConfigError


def level(flag: str | None, options: ServerOptions, devmode: bool, env: dict[str, str]) -> int:
    return resolve_log_level(flag, explicit_log_level(options, devmode), env,
                             default=logging.DEBUG if devmode else logging.INFO)


def test_flag_beats_option_beats_environment() -> None:
    explicit = ServerOptions(log_level="error")
    env = {"LIVEKIT_LOG_LEVEL": "warn"}
    assert level("trace", explicit, False, env) == TRACE
    assert level(None, explicit, False, env) == logging.ERROR
    assert level(None, ServerOptions(), False, env) == logging.WARNING  # default hides nothing
    assert level(None, ServerOptions(), False, {}) == logging.INFO
    assert level(None, ServerOptions(), True, {}) == logging.DEBUG
    per_mode = ServerOptions(log_level=ServerEnvOption("trace", "critical"))
    assert level(None, per_mode, True, env) == TRACE
    assert level(None, per_mode, False, env) == logging.CRITICAL


def test_load_server_from_file_prefers_server_name(tmp_path: Path) -> None:
    (tmp_path / "my_agent_a.py").write_text(
        "from trio_agents import AgentServer\n"
        "other = AgentServer()\n"
        "server = AgentServer(agent_name='picked')\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('the __main__ block must not run')\n"
    )
    try:
        found = load_server(str(tmp_path / "my_agent_a.py"))
        assert found.options.agent_name == "picked"
        assert load_server(f"{tmp_path / 'my_agent_a.py'}:other").options.agent_name == ""
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_agent_a", None)


def test_load_server_accepts_worker_options(tmp_path: Path) -> None:
    (tmp_path / "my_agent_b.py").write_text(
        "from trio_agents import WorkerOptions\n"
        "async def entry(ctx): pass\n"
        "opts = WorkerOptions(entrypoint_fnc=entry, agent_name='legacy')\n"
    )
    try:
        server = load_server(str(tmp_path / "my_agent_b.py"))
        assert isinstance(server, AgentServer) and server.options.agent_name == "legacy"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_agent_b", None)


@pytest.mark.parametrize(
    ("target", "message"),
    [("does/not/exist.py", "no such file"), ("no_such_module_xyz", "cannot import")],
)
def test_load_server_errors_name_the_problem(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server(target)


def test_entrypoint_must_be_async() -> None:
    server = AgentServer()

    def not_async(ctx: object) -> None:
        pass

    with pytest.raises(ConfigError, match="must be an async function"):
        server.rtc_session(not_async)  # type: ignore[arg-type]


def test_only_one_rtc_session() -> None:
    server = AgentServer()

    async def entry(ctx: object) -> None:
        pass

    server.rtc_session(entry)
    with pytest.raises(RuntimeError, match="only one"):
        server.rtc_session(entry)


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown AgentServer option"):
        AgentServer(load_treshold=0.5)
