"""Prometheus metrics: ``/metrics`` on the health port and on ``prometheus_port``, values that
move with a job run (dev server over TCP, real job processes), offer answers and
registrations in virtual time, and the cause labels of failed jobs."""

from __future__ import annotations

import platform
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from livekit.protocol import agent
from prometheus_client.parser import text_string_to_metric_families

from agents import api_agent, scripted
from control_helpers import make_control, running
from test_server import dev, dispatch, final_status, make_server, serving  # noqa: F401
from trio_agents import ConfigError, JobRequest
from trio_agents._ipc import FAILED, JobFinished
from trio_agents._metrics import FAILURE_CAUSES, ServerMetrics, job_cause
from trio_agents._options import ServerOptions, resolve_options
from trio_agents._proc import INTERRUPTED, outcome
from trio_agents.devserver import DevServer, open_dev_server
from trio_agents.testing import memory_opener

NODE = platform.node()
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (name, labels without nodename)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("nodename", NODE) == NODE
            samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


async def test_metrics_move_with_a_job_run(dev: DevServer) -> None:
    server = make_server(dev, prometheus_port=0)
    server.rtc_session(scripted.entrypoint, agent_name="scripted")
    async with serving(server):
        before = await scrape(server.health_port)
        assert value(before, "trio_agents_registered") == 1
        assert value(before, "trio_agents_registrations_total") == 1
        assert value(before, "lk_agents_active_job_count") == 0
        assert value(before, "trio_agents_offers_total", answer="accepted") == 0
        # the idle process was initialized: livekit-agents' histogram and our spawn time
        await server._supervisor.wait_pool_ready()  # type: ignore[union-attr]
        ready = await scrape(server.health_port)
        assert value(ready, "lk_agents_proc_initialize_duration_seconds_count") >= 1
        assert value(ready, "trio_agents_process_spawn_duration_seconds_count") >= 1
        assert value(ready, "lk_agents_child_process_count") >= 1

        ok = await dispatch(dev, "r-ok", "ok")
        failed = await dispatch(dev, "r-raise", "raise")
        assert (await final_status(dev, ok))[0] == agent.JS_SUCCESS
        assert (await final_status(dev, failed))[0] == agent.JS_FAILED
        await dispatch(dev, "r-sleep", "sleep:30")
        await dev.wait_until(lambda: len(server.active_jobs) == 1)
        (sleeping,) = server.active_jobs

        during = await scrape(server.health_port)
        assert value(during, "lk_agents_active_job_count") == 1
        assert value(during, "trio_agents_offers_total", answer="accepted") == 3
        assert value(during, "trio_agents_jobs_total", status="JS_SUCCESS", cause="success") == 1
        assert value(during, "trio_agents_jobs_total", status="JS_FAILED", cause="error") == 1
        assert value(during, "trio_agents_dispatch_latency_seconds_count") == 3
        assert value(during, "trio_agents_dispatch_latency_seconds_sum") > 0
        memory = value(during, "trio_agents_job_process_memory_bytes", job_id=sleeping.job.id)
        assert memory > 1 << 20  # a Python process: more than a megabyte
        assert value(during, "trio_agents_draining") == 0
        assert value(during, "trio_agents_registered_duration_seconds") > 0

        # the same figures on prometheus_port, which serves nothing else
        assert server.prometheus_port not in (0, server.health_port)
        other = await scrape(server.prometheus_port)
        assert value(other, "trio_agents_offers_total", answer="accepted") == 3
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{server.prometheus_port}/")
        assert health.status_code == 404

        drained = trio.Event()

        async def drain() -> None:
            await server.drain(timeout=0.001)
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await dev.wait_until(lambda: server.draining)
            draining = await scrape(server.health_port)
            assert value(draining, "trio_agents_draining") == 1
            await drained.wait()
    assert server.metrics is not None
    after = parse((await server.metrics.scrape()).decode())
    assert value(after, "trio_agents_jobs_total", status="JS_FAILED", cause="interrupted") == 1
    assert value(after, "lk_agents_active_job_count") == 0


async def test_two_servers_in_one_process_keep_their_own_figures(dev: DevServer) -> None:
    first, second = make_server(dev), make_server(dev)
    first.rtc_session(scripted.entrypoint, agent_name="scripted")
    second.rtc_session(scripted.entrypoint, agent_name="other")
    async with serving(first), serving(second):
        await dispatch(dev, "r1", "ok")
        one, two = await scrape(first.health_port), await scrape(second.health_port)
    assert value(one, "trio_agents_offers_total", answer="accepted") == 1
    assert value(two, "trio_agents_offers_total", answer="accepted") == 0


def test_prometheus_port_is_checked() -> None:
    with pytest.raises(ConfigError, match="prometheus_port"):
        resolve_options(ServerOptions(prometheus_port=70000), devmode=True, environ={},
                        require_credentials=False)
    config = resolve_options(ServerOptions(), devmode=True, require_credentials=False,
                             environ={"PROMETHEUS_MULTIPROC_DIR": "/tmp/x"})
    assert (config.prometheus_port, config.prometheus_multiproc_dir) == (None, "/tmp/x")


# -- the control plane's events, in virtual time --------------------------------------------


@pytest.fixture
async def memory_dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(listen=False, api_key="devkey", api_secret="secret") as server:
        yield server


async def test_offer_answers_and_registrations_are_counted(
    memory_dev: DevServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    dev = memory_dev

    async def on_request(req: JobRequest) -> None:
        if req.room.name == "take":
            await req.accept()
        elif req.room.name == "refuse":
            await req.reject()
        else:
            await trio.sleep_forever()  # past request_timeout: a timeout

    control, supervisor = make_control(memory_opener(dev, nursery), request_fnc=on_request)
    metrics = control.metrics = ServerMetrics(nodename="n")

    def count(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, {"nodename": "n", **labels}) or 0.0

    async with running(control) as worker_id:
        assert count("trio_agents_registrations_total") == 1
        for room in ("take", "refuse", "stall"):
            await dev.create_room(room)
        await dev.wait_until(lambda: len(dev.jobs) == 3 and all(
            j.done for j in dev.jobs.values()))
        assert count("trio_agents_offers_total", answer="accepted") == 1
        assert count("trio_agents_offers_total", answer="rejected") == 1
        assert count("trio_agents_offers_total", answer="timeout") == 1
        control.start_draining()
        await dev.create_room("late")
        await dev.wait_until(lambda: len(dev.jobs) == 4 and all(
            j.done for j in dev.jobs.values()))
        assert count("trio_agents_offers_total", answer="rejected") == 2
        dev.drop_worker(worker_id)
        await dev.wait_until(lambda: control.registered and control.worker_id != worker_id)
        assert count("trio_agents_reconnects_total") == 1
        assert count("trio_agents_registrations_total") == 2
    assert len(supervisor.launched) == 1


# -- causes ---------------------------------------------------------------------------------


def test_failed_jobs_get_a_cause_from_their_error() -> None:
    def cause(returncode: int | None, finished: JobFinished | None = None, **kw: object) -> str:
        return job_cause(*outcome(returncode, finished, **kw))  # type: ignore[arg-type]

    assert cause(0, JobFinished(outcome="success")) == "success"
    assert cause(0, JobFinished(outcome=FAILED, error="ValueError: x")) == "error"
    assert cause(-9) == "process_died"
    assert cause(3) == "process_died"
    assert cause(0) == "process_died"
    assert cause(None, interrupted=True) == "interrupted"
    assert cause(-15, escalated="did not stop within 2 s of the shutdown request") \
        == "shutdown_timeout"
    assert cause(None, kill_reason="killed: memory limit 100 MB exceeded (120 MB pss)") \
        == "memory_limit"
    assert cause(None, kill_reason="killed: no pong for 60 s (the job blocks its event loop)") \
        == "unresponsive"
    assert INTERRUPTED.startswith("stopped before it finished")
    assert len({c for _, c in FAILURE_CAUSES}) < 12  # a label, not a message


@pytest.mark.parametrize("given_by", ["option", "environment"])
async def test_multiproc_dir_adds_what_job_processes_record(
    dev: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    given_by: str,
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_999.db").write_bytes(b"stale: from a previous run")
    if given_by == "option":
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        server = make_server(dev, prometheus_multiproc_dir=str(directory))
    else:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        server = make_server(dev)
    server.rtc_session(api_agent.count_in_job, agent_name="scripted")
    async with serving(server):
        assert not (directory / "counter_999.db").exists()
        job_id = await dispatch(dev, "r-count", "")
        assert (await final_status(dev, job_id))[0] == agent.JS_SUCCESS
        samples = await scrape(server.health_port)
    assert value(samples, "job_custom_events_total", room="r-count") == 3
    assert value(samples, "trio_agents_offers_total", answer="accepted") == 1
