from __future__ import annotations

import math

import pytest

from trio_agents import ServerOptions, WorkerOptions
from trio_agents._errors import ConfigError
from trio_agents._options import agent_url, http_to_ws, resolve_options

ENV = {"LIVEKIT_URL": "https://example.livekit.cloud/", "LIVEKIT_API_KEY": "k",
       "LIVEKIT_API_SECRET": "s"}


def test_worker_options_is_server_options() -> None:
    assert WorkerOptions is ServerOptions


def test_dev_and_prod_defaults() -> None:
    dev = resolve_options(ServerOptions(), devmode=True, environ=ENV)
    prod = resolve_options(ServerOptions(), devmode=False, environ=ENV)
    assert (dev.load_threshold, dev.num_idle_processes, dev.port, dev.log_level) == (
        math.inf, 0, 0, "DEBUG")
    assert (prod.load_threshold, prod.port, prod.log_level) == (0.7, 8081, "INFO")
    assert 1 <= prod.num_idle_processes <= 4
    assert prod.options.drain_timeout == 1800 and prod.options.shutdown_process_timeout == 10


def test_environment_is_read_in_one_place() -> None:
    config = resolve_options(ServerOptions(), devmode=False,
                             environ={**ENV, "LIVEKIT_AGENT_NAME": "env-name"})
    assert config.ws_url == "wss://example.livekit.cloud"
    assert (config.api_key, config.api_secret, config.agent_name) == ("k", "s", "env-name")
    explicit = resolve_options(ServerOptions(ws_url="ws://x:1", agent_name="mine"),
                               devmode=False, environ=ENV)
    assert (explicit.ws_url, explicit.agent_name) == ("ws://x:1", "mine")


@pytest.mark.parametrize("missing", ["LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"])
def test_missing_variable_is_named(missing: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(ConfigError, match=f"{missing} is not set"):
        resolve_options(ServerOptions(), devmode=False, environ=env)


def test_urls() -> None:
    assert http_to_ws("http://h:7880") == "ws://h:7880"
    assert agent_url("https://h/prefix/") == "wss://h/prefix/agent"
    with pytest.raises(ConfigError, match="not a ws://"):
        http_to_ws("localhost:7880")


@pytest.mark.parametrize("field", ["drain_timeout", "request_timeout", "ping_timeout"])
def test_non_positive_timeouts_are_rejected(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        resolve_options(ServerOptions(**{field: 0}), devmode=False, environ=ENV)  # type: ignore[arg-type]


def test_job_executor_type_given_as_its_value() -> None:
    from trio_agents import JobExecutorType, ServerOptions

    assert ServerOptions(job_executor_type="thread").job_executor_type is JobExecutorType.THREAD
    with pytest.raises(ValueError):
        ServerOptions(job_executor_type="fiber")
