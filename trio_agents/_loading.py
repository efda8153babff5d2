"""Finding the user's functions again in a job process.

A job process is a fresh interpreter (``python -m trio_agents._child``), so it cannot receive
function objects: it receives a ``FunctionRef`` and imports the function the way the server
found it. ``FunctionRef.of(fn)`` runs at server start, so an entrypoint the child could never
find (a lambda, a nested function, a ``functools.partial``) is a ``ConfigError`` there, not a
failure of the first job.

A function defined in a script run as ``python agent.py`` lives in ``__main__``. The child
loads that file under the module name ``__trio_agents_main__``, so the script's
``if __name__ == "__main__":`` block (which starts the server) does not run a second time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Final, final

import attrs

from ._errors import ConfigError

#: Module name under which a script run as ``__main__`` is loaded in a job process.
MAIN_ALIAS: Final = "__trio_agents_main__"

_importing: list[str] = []
"""The user's scripts/modules being imported right now to find its functions (job process,
zygote): starting a server then means the script has no ``__main__`` guard."""


class UnguardedScript(ConfigError):
    """The user's script starts the agent server when it is imported (no ``__main__`` guard)."""


def refuse_while_importing(call: str) -> None:
    """Called first by ``cli.run_app``: ``UnguardedScript`` if a job process or the zygote is
    importing the user's code (which must not start a server there)."""
    if _importing:
        raise UnguardedScript(
            f"{_importing[-1]} calls {call} when it is imported (a job process imports it to "
            f"find the entrypoint); put that call under `if __name__ == \"__main__\":`")


@final
@attrs.frozen
class FunctionRef:
    """Where to find a module-level function: ``module:qualname`` (+ ``path`` for a script)."""

    module: str
    qualname: str
    path: str = ""
    """For a function of ``__main__``: the script file, loaded as ``__trio_agents_main__``."""

    @classmethod
    def of(cls, fn: Callable[..., object], *, what: str = "function") -> FunctionRef:
        """The reference of ``fn``; ``ConfigError`` if a job process could not import it.

        ``what`` names the role in the error message ("entrypoint", "setup_fnc", ...).
        """
        name = getattr(fn, "__qualname__", None)
        module = getattr(fn, "__module__", None)
        fix = (f"define the {what} as a plain function at the top level of a module (or of the "
               "script you run), so the job process can import it")
        if not isinstance(name, str) or not isinstance(module, str):
            raise ConfigError(f"the {what} {fn!r} has no importable name; {fix}")
        if "<lambda>" in name or "<locals>" in name:
            raise ConfigError(f"the {what} {module}.{name} is a lambda or a nested function; {fix}")
        path = ""
        if module == "__main__":
            main = sys.modules.get("__main__")
            path = getattr(main, "__file__", None) or ""
            if not path:
                raise ConfigError(
                    f"the {what} {name} is defined in an interactive __main__ with no file; {fix}"
                )
        ref = cls(module, name, path)
        try:
            found = ref._resolve(sys.modules["__main__"] if path else importlib.import_module(module))
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"the {what} {module}:{name} cannot be imported ({exc}); {fix}") from exc
        if found is not fn:
            raise ConfigError(
                f"{module}:{name} is not the {what} that was given (the name is bound to "
                f"another object, e.g. a decorator wrapped it); {fix}"
            )
        return ref

    def load(self) -> Callable[..., object]:
        """Import and return the function (in a job process). Errors propagate as they are."""
        if self.path:
            module = sys.modules.get(MAIN_ALIAS) or _load_script(self.path)
        else:
            _importing.append(self.module)
            try:
                module = importlib.import_module(self.module)
            finally:
                _importing.pop()
        return self._resolve(module)

    def _resolve(self, module: ModuleType) -> Callable[..., object]:
        target: object = module
        for part in self.qualname.split("."):
            target = getattr(target, part)
        if not callable(target):
            raise AttributeError(f"{self} is not callable")
        return target

    def __str__(self) -> str:
        return f"{self.path or self.module}:{self.qualname}"


def _load_script(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MAIN_ALIAS, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MAIN_ALIAS] = module
    _importing.append(path)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MAIN_ALIAS]
        raise
    finally:
        _importing.pop()
    return module
