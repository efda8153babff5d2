"""An agent whose module starts a thread when it is imported (the zygote must not fork it)."""

import threading
import time

from trio_agents import JobContext

threading.Thread(target=time.sleep, args=(3600,), name="import-time-worker", daemon=True).start()


async def entrypoint(ctx: JobContext) -> None:
    pass
