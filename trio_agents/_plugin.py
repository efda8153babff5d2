"""Plugins: packages that extend agents and may need files downloaded before first use.

As in livekit-agents, a plugin registers itself once (from the main thread, usually when its
package is imported) and ``python agent.py download-files`` calls ``download_files()`` on
every registered plugin.
"""

from __future__ import annotations

import logging
import threading
from typing import ClassVar

logger = logging.getLogger("trio_agents")


class Plugin:
    """Base class of a plugin; subclass it and override ``download_files``."""

    registered_plugins: ClassVar[list[Plugin]] = []

    def __init__(
        self, title: str, version: str, package: str, logger: logging.Logger | None = None
    ) -> None:
        self._title = title
        self._version = version
        self._package = package
        self._logger = logger

    @classmethod
    def register_plugin(cls, plugin: Plugin) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("plugins must be registered on the main thread")
        cls.registered_plugins.append(plugin)

    def download_files(self) -> None:
        """Fetch what the plugin needs (models, weights); the default has nothing to fetch."""

    @property
    def title(self) -> str:
        return self._title

    @property
    def version(self) -> str:
        return self._version

    @property
    def package(self) -> str:
        return self._package

    @property
    def logger(self) -> logging.Logger | None:
        return self._logger

    @classmethod
    def download_all(cls) -> int:
        """Run every plugin's ``download_files``; the exit code is 1 if any of them failed."""
        failed = 0
        for plugin in cls.registered_plugins:
            logger.info("downloading files for %s %s", plugin.title, plugin.version)
            try:
                plugin.download_files()
            except Exception:
                failed += 1
                logger.exception("downloading files for %s failed", plugin.title)
        logger.info("downloaded files for %d plugin(s), %d failed",
                    len(cls.registered_plugins) - failed, failed)
        return 1 if failed else 0
