"""The public surface: everything in __all__ exists, and nothing private leaks into it."""

import trio_agents


def test_all_names_exist_and_are_public() -> None:
    for name in trio_agents.__all__:
        assert hasattr(trio_agents, name), name
        assert not name.startswith("_") or name == "__version__"
    assert {"AgentServer", "Worker", "WorkerOptions", "ServerOptions", "JobContext",
            "JobProcess", "JobRequest", "JobAcceptArguments", "RunningJobInfo",
            "WorkerPermissions", "ServerType", "WorkerType", "JobExecutorType",
            "AssignmentTimeoutError", "Plugin"} <= set(trio_agents.__all__)


def test_cli_module_is_importable() -> None:
    from trio_agents import cli

    assert callable(cli.run_app)
