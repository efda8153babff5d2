"""The command line as users run it: a real subprocess against the dev server."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import AsyncIterator

import pytest
import trio
from livekit.protocol import agent

from cli_helpers import run_cli
from trio_agents._proc import INTERRUPTED
from trio_agents.devserver import DevServer, open_dev_server

AGENT = "tests/agents/cli_agent.py"


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with open_dev_server(port=0) as server:
        yield server


def livekit_env(dev: DevServer) -> dict[str, str]:
    return {"LIVEKIT_URL": dev.url, "LIVEKIT_API_KEY": dev.api_key,
            "LIVEKIT_API_SECRET": dev.api_secret}


async def start_jobs(dev: DevServer, metadata: list[str]) -> list[str]:
    for n, meta in enumerate(metadata):
        await dev.create_dispatch(f"room-{n}", "scripted", metadata=meta)
    await dev.wait_until(lambda: sum(j.status == agent.JS_RUNNING for j in dev.jobs.values())
                         >= len(metadata))
    return list(dev.jobs)


async def test_start_writes_json_lines_with_job_records(dev: DevServer) -> None:
    async with run_cli([AGENT, "start"], env=livekit_env(dev)) as cli:
        await cli.wait_for("registered worker")
        (job_id,) = await start_jobs(dev, ["sleep:0.1"])
        await cli.wait_for("started sleep")
        await dev.wait_until(lambda: dev.jobs[job_id].ended)
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0
    records = [json.loads(line) for line in cli.lines if line.startswith("{")]
    assert len(records) == len([line for line in cli.lines if line.strip()])  # only JSON
    job_record = next(r for r in records if r["message"] == "started sleep")
    assert job_record["job_id"] == job_id and job_record["room"] == "room-0"
    assert job_record["agent_name"] == "scripted" and job_record["name"] == "agents.scripted"
    assert job_record["level"] == "INFO" and job_record["pid"] != records[0]["pid"]
    assert {"timestamp", "scripted"} <= job_record.keys()  # the job's log_context_fields too


async def test_sigterm_drains_running_jobs_and_refuses_new_ones(dev: DevServer) -> None:
    async with run_cli([AGENT, "start"], env={**livekit_env(dev), "TEST_IDLE": "3"}) as cli:
        await cli.wait_for("registered worker")
        jobs = await start_jobs(dev, ["sleep:0.5", "sleep:1", "sleep:1.5"])
        cli.signal(signal.SIGTERM)
        await cli.wait_for("draining")
        worker_id = next(iter(dev.workers))
        await dev.wait_until(lambda: dev.workers[worker_id].status == agent.WS_FULL)
        await dev.create_dispatch("late-room", "scripted", metadata="ok")
        await dev.wait_until(lambda: any(j.room == "late-room" and j.done
                                         for j in dev.jobs.values()))
        cli.signal(signal.SIGTERM)  # the same signal again changes nothing
        assert await cli.wait() == 0
    assert [dev.jobs[j].status for j in jobs] == [agent.JS_SUCCESS] * 3
    late = next(j for j in dev.jobs.values() if j.room == "late-room")
    assert late.dropped and late.worker_id == ""


async def test_second_signal_stops_jobs_through_the_escalation(dev: DevServer) -> None:
    async with run_cli([AGENT, "start"], env=livekit_env(dev)) as cli:
        await cli.wait_for("registered worker")
        (job_id,) = await start_jobs(dev, ["sleep:3600"])
        cli.signal(signal.SIGTERM)
        await cli.wait_for("draining")
        cli.signal(signal.SIGINT)
        assert await cli.wait() == 3
    assert (dev.jobs[job_id].status, dev.jobs[job_id].error) == (agent.JS_FAILED, INTERRUPTED)


async def test_idle_sigterm_exits_closing_websocket_and_health(dev: DevServer) -> None:
    async with run_cli([AGENT, "start"], env=livekit_env(dev)) as cli:
        health = json.loads(await cli.wait_for("health endpoint"))["health_port"]
        await cli.wait_for("registered worker")
        (worker_id,) = dev.workers
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0
    await dev.wait_until(lambda: worker_id not in dev.workers)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", health)


async def test_signal_during_prewarm_still_drains_cleanly(dev: DevServer) -> None:
    env = {**livekit_env(dev), "TEST_IDLE": "2"}
    async with run_cli([AGENT, "start"], env=env) as cli:
        await cli.wait_for("health endpoint")  # the pool is starting its processes now
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_dev_without_url_runs_the_demo_job() -> None:
    async with run_cli(["examples/minimal.py", "dev", "--no-reload"]) as cli:
        await cli.wait_for("embedded dev server")
        await cli.wait_for("dispatched a demo job to room 'demo-room'; Ctrl-C to stop")
        await cli.wait_for("hello from job AJ_.* in room 'demo-room'")
        await cli.wait_for("finished \\(entrypoint returned\\)")
        cli.signal(signal.SIGINT)
        assert await cli.wait() == 0
    assert not [line for line in cli.lines if "save a file" in line]  # nothing reloads


async def test_dev_first_ctrl_c_stops_running_jobs(dev: DevServer) -> None:
    # dev against a LiveKit (no file watcher): the first SIGINT stops, it does not drain;
    # the job goes through the shutdown escalation (shutdown_process_timeout=2 s in the agent)
    async with run_cli([AGENT, "dev", "--no-reload"], env=livekit_env(dev), timeout=30) as cli:
        await cli.wait_for("registered worker")
        (job_id,) = await start_jobs(dev, ["sleep:3600"])
        await cli.wait_for("started sleep")
        cli.signal(signal.SIGINT)
        await cli.wait_for("SIGINT received: stopping")
        assert await cli.wait() == 3, "\n".join(cli.lines)  # stopped with a job still running
    assert (dev.jobs[job_id].status, dev.jobs[job_id].error) == (agent.JS_FAILED, INTERRUPTED)
    assert not [line for line in cli.lines if "draining" in line]


async def test_dev_reloads_on_change(tmp_path: trio.Path) -> None:
    source = trio.Path("examples/minimal.py")
    agent_file = trio.Path(tmp_path) / "reloading_agent.py"
    await agent_file.write_text(await source.read_text())
    async with run_cli([str(agent_file), "dev"]) as cli:
        first = await cli.wait_for("started the agent server \\(pid")
        await cli.wait_for("hello from job")
        await agent_file.write_text(await agent_file.read_text() + "\n# changed\n")
        await cli.wait_for("changed: reloading")
        second = await cli.wait_for("started the agent server \\(pid", count=2)
        assert second.split("pid")[1] != first.split("pid")[1]  # a new server process
        await cli.wait_for("registered worker", count=2)
        cli.signal(signal.SIGINT)
        assert await cli.wait() == 0


async def test_dev_survives_a_syntax_error_and_restarts_when_fixed(tmp_path: trio.Path) -> None:
    from livekit.protocol import room as room_proto

    from trio_agents.api import LiveKitAPI

    source = await trio.Path("examples/minimal.py").read_text()
    agent_file = trio.Path(tmp_path) / "editing_agent.py"
    await agent_file.write_text(source)
    async with run_cli([str(agent_file), "dev"], timeout=40) as cli:
        url = (await cli.wait_for("embedded dev server at ws://")).split(" at ")[1].split()[0]
        await cli.wait_for("hello from job")
        async with LiveKitAPI(url, "devkey", "secret") as api:
            await api.room.create_room(room_proto.CreateRoomRequest(name="kept",
                                                                    empty_timeout=600))
            await cli.wait_for("hello from job .* in room 'kept'")
            await agent_file.write_text(source + "\ndef broken(:\n")  # saved mid-edit
            await cli.wait_for("SyntaxError")  # the child's traceback, on the terminal
            await cli.wait_for("exited with code 1; fix the error and save a file")
            await agent_file.write_text(source)
            await cli.wait_for("changed: restarting the agent server")
            await cli.wait_for("registered worker", count=2)
            rooms = await api.room.list_rooms(room_proto.ListRoomsRequest())
            assert "kept" in [r.name for r in rooms.rooms]  # the dev server stayed up
            await api.room.create_room(room_proto.CreateRoomRequest(name="after-fix"))
            await cli.wait_for("hello from job .* in room 'after-fix'")
        cli.signal(signal.SIGINT)
        # 0, or 3 if the last job's process had not exited yet: stopped, not failed
        assert await cli.wait() in (0, 3)
    assert len([line for line in cli.lines if "embedded dev server at" in line]) == 1


async def test_log_level_flag_beats_environment(dev: DevServer) -> None:
    env = {**livekit_env(dev), "LIVEKIT_LOG_LEVEL": "debug"}
    async with run_cli([AGENT, "start", "--log-level", "WARN"], env=env) as cli:
        await dev.wait_until(lambda: len(dev.workers) == 1)
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0
    assert not [line for line in cli.lines if '"level": "INFO"' in line]
    async with run_cli([AGENT, "start"], env=env) as cli:
        await cli.wait_for('"level": "DEBUG"')
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_bad_secret_is_one_clear_line_and_exit_1(dev: DevServer) -> None:
    env = {**livekit_env(dev), "LIVEKIT_API_SECRET": "wrong"}
    async with run_cli([AGENT, "start"], env=env) as cli:
        assert await cli.wait() == 1
    errors = [line for line in cli.lines if "rejected our credentials" in line]
    assert len(errors) == 1 and "LIVEKIT_API_SECRET" in errors[0]
    assert not [line for line in cli.lines if "retrying" in line]


@pytest.mark.parametrize(("url", "message"), [
    ("localhost:7880", "not a ws://, wss://, http:// or https:// URL"),
])
async def test_bad_url_is_one_clear_line(dev: DevServer, url: str, message: str) -> None:
    async with run_cli([AGENT, "start", "--url", url], env=livekit_env(dev)) as cli:
        assert await cli.wait() == 1
    assert len([line for line in cli.lines if message in line]) == 1


async def test_missing_url_names_the_variable() -> None:
    async with run_cli([AGENT, "start"], env={"LIVEKIT_API_KEY": "k",
                                              "LIVEKIT_API_SECRET": "s"}) as cli:
        assert await cli.wait() == 1
    assert any("LIVEKIT_URL is not set" in line for line in cli.lines)


async def test_health_port_in_use_is_a_clear_error(dev: DevServer) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**livekit_env(dev), "TEST_HEALTH_PORT": str(port)}
        async with run_cli([AGENT, "start"], env=env) as cli:
            assert await cli.wait() == 1
    # one line, the message (it names the port and the fix), no traceback
    (line,) = [line for line in cli.lines if line.strip()]
    record = json.loads(line)
    assert record["level"] == "CRITICAL"
    assert f":{port}" in record["message"] and "another port" in record["message"]


async def test_connect_dispatches_to_the_named_room(dev: DevServer) -> None:
    env = {**livekit_env(dev)}
    async with run_cli([AGENT, "connect", "--room", "meeting", "--log-level", "info"],
                       env=env) as cli:
        await dev.wait_until(lambda: any(j.room == "meeting" and j.status == agent.JS_SUCCESS
                                         for j in dev.jobs.values()))
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


async def test_devserver_command_reports_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        async with run_cli(["-m", "trio_agents", "devserver", "--port", str(port)]) as cli:
            assert await cli.wait() == 2
    assert any(f"127.0.0.1:{port}" in line and "another port" in line for line in cli.lines)


async def test_health_is_503_until_registered() -> None:
    import httpx

    with socket.socket() as probe:  # a port nobody listens on: LiveKit is unreachable
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    env = {"LIVEKIT_URL": f"ws://127.0.0.1:{dead_port}", "LIVEKIT_API_KEY": "devkey",
           "LIVEKIT_API_SECRET": "secret", "TEST_HEALTH_PORT": str(health_port)}
    async with run_cli([AGENT, "start"], env=env) as cli:
        await cli.wait_for("LiveKit connection failed")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{health_port}") as http:
            ready = await http.get("/")
            assert (ready.status_code, ready.text) == (503, "not registered")
            assert (await http.get("/health/live")).status_code == 200
            assert (await http.get("/worker")).json()["registered"] is False
        cli.signal(signal.SIGTERM)
        assert await cli.wait() == 0


@pytest.mark.parametrize(("broken", "code"), [(False, 0), (True, 1)])
async def test_download_files_runs_every_plugin(tmp_path: trio.Path, broken: bool,
                                                code: int) -> None:
    target = trio.Path(tmp_path) / "downloaded"
    env = {"TEST_DOWNLOADED": str(target), **({"TEST_BROKEN_PLUGIN": "1"} if broken else {})}
    async with run_cli(["tests/agents/plugin_agent.py", "download-files"], env=env) as cli:
        assert await cli.wait() == code
    assert await target.read_text() == "model weights"  # the others still ran
    expected = "1 failed" if broken else "0 failed"
    assert any(expected in line for line in cli.lines)
