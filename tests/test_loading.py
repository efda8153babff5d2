"""FunctionRef: how a job process finds the user's functions again."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trio_agents._errors import ConfigError
from trio_agents._loading import MAIN_ALIAS, FunctionRef

from agents import scripted


def test_module_function_round_trips() -> None:
    ref = FunctionRef.of(scripted.entrypoint, what="entrypoint")
    assert ref == FunctionRef("agents.scripted", "entrypoint", "")
    assert ref.load() is scripted.entrypoint


def test_nested_lambda_partial_are_config_errors_naming_the_fix() -> None:
    def nested() -> None: ...

    for fn, match in ((nested, "nested function"), (lambda: None, "lambda"),
                      (functools.partial(scripted.setup), "no importable name")):
        with pytest.raises(ConfigError, match=match) as info:
            FunctionRef.of(fn, what="setup_fnc")
        assert "define the setup_fnc as a plain function at the top level" in str(info.value)


def test_rebound_name_is_refused() -> None:
    def impostor() -> None: ...

    impostor.__module__ = "agents.scripted"
    impostor.__qualname__ = "setup"
    with pytest.raises(ConfigError, match="is not the entrypoint that was given"):
        FunctionRef.of(impostor, what="entrypoint")


SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = {paths!r}
    import trio
    from proc_helpers import job_info, make_config
    from trio_agents._supervisor import ProcessSupervisor

    async def entrypoint(ctx):
        print("entrypoint ran in", __name__, flush=True)

    if __name__ == "__main__":
        print("main block ran", flush=True)

        async def main():
            results = []
            sup = ProcessSupervisor(make_config(entrypoint_fnc=entrypoint),
                                    report=lambda *a: results.append(a))
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await sup.launch(job_info("m", "ok"))
                await sup.wait_idle()
                nursery.cancel_scope.cancel()
            print("final", results[-1], flush=True)

        trio.run(main)
""")


def test_script_run_as_main_is_loaded_under_another_name(tmp_path: Path) -> None:
    script = tmp_path / "my_agent.py"
    script.write_text(SCRIPT.format(paths=[p for p in sys.path if p]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    assert out == ["main block ran", f"entrypoint ran in {MAIN_ALIAS}", "final ('m', 2, '')"]
