"""An agent with two plugins for ``download-files``: one downloads, one fails."""

import os

from trio_agents import AgentServer, Plugin, cli


class Fetching(Plugin):
    def download_files(self) -> None:
        with open(os.environ["TEST_DOWNLOADED"], "w") as out:
            out.write("model weights")


class Broken(Plugin):
    def download_files(self) -> None:
        raise OSError("no network")


Plugin.register_plugin(Fetching("fetching", "1.0", "fetching_plugin"))
if os.environ.get("TEST_BROKEN_PLUGIN"):
    Plugin.register_plugin(Broken("broken", "0.1", "broken_plugin"))

server = AgentServer()

if __name__ == "__main__":
    cli.run_app(server)
