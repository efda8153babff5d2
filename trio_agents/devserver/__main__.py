"""``python -m trio_agents devserver`` / ``python -m trio_agents.devserver``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from .._errors import ConfigError
from ._server import open_dev_server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trio-agents devserver",
                                     description="A local LiveKit-compatible server for agents.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7880)
    parser.add_argument("--api-key", default="devkey")
    parser.add_argument("--api-secret", default="secret")
    parser.add_argument("--availability-timeout", type=float, default=3.0,
                        help="seconds a job offer may take, retries included (default 3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def serve() -> None:
        async with open_dev_server(host=args.host, port=args.port, api_key=args.api_key,
                                   api_secret=args.api_secret,
                                   availability_timeout=args.availability_timeout) as dev:
            print(f"LiveKit dev server on {dev.url}  (LIVEKIT_URL={dev.url} "
                  f"LIVEKIT_API_KEY={dev.api_key} LIVEKIT_API_SECRET={dev.api_secret})",
                  flush=True)
            await trio.sleep_forever()

    try:
        trio.run(serve)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
